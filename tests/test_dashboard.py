"""The web dashboard in a real browser (Debian's chromium, driven by Playwright) against a real service.

Skipped only where chromium is not installed (``make test`` installs it with
apt-get); the skip says so. The page is reached the two ways a user reaches
it: through ``supervisor dashboard`` (a loopback proxy to the unix socket,
with a one-time token) and on the TCP listener (its token, then a cookie).
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from supervisor.api.client import connect_unix
from supervisor.api.live import MAX_STREAMS

from .service_fixture import SUPERVISOR, ServiceProcess, with_tcp_listener

Start = Callable[..., ServiceProcess]
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MANIFEST = """
version: 1
instances:
  web:
    command: ["sh", "-c", "echo hello from $$$$; exec sleep 300"]
    replicas: 2
    restart: {min_uptime: 0}
    stop: {timeout: 2}
  idle:
    command: ["sleep", "300"]
    autostart: false
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing (make test installs Debian's chromium): browser tests skipped")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def dashboard(service: Start) -> Iterator[tuple[ServiceProcess, str]]:
    """A service, and ``supervisor dashboard`` for it: (the service, the URL it printed)."""
    svc = service(MANIFEST)
    svc.wait_for(["web"], "running")
    proc = subprocess.Popen(
        [*SUPERVISOR, "dashboard", "-s", str(svc.socket)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "supervisor dashboard printed no URL within 30s"
        line = proc.stdout.readline().decode()
        match = re.fullmatch(r"dashboard: (http://127\.0\.0\.1:\d+/\?token=\S+)\n", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        yield svc, match.group(1)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130


def test_the_dashboard_lists_restarts_and_follows(browser: Any, dashboard: tuple[ServiceProcess, str],
                                                   tmp_path: Path) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=20_000)
    svc, url = dashboard
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    assert page.url.endswith("/") and "token" not in page.url  # the token left the address bar
    rows = page.locator("#instances tbody tr")
    expect(rows).to_have_count(3)
    expect(page.locator("#connection")).to_have_text("live")
    web0 = page.locator('tr[data-name="web-0"]')
    expect(web0.locator(".state")).to_have_text("running")
    expect(web0.locator(".mem")).to_have_text(re.compile(r"^\d+(\.\d)?[KMG]$"))
    expect(page.locator('tr[data-name="idle"] .pid')).to_have_text("-")
    first = web0.locator(".pid").inner_text()
    assert first == str(svc.status("web-0")["web-0"]["pid"])

    # The log pane: the last lines, then what comes.
    web0.locator('button[data-action="logs"]').click()
    log = page.locator("#log-lines")
    expect(log).to_contain_text(f"hello from {first}")

    web0.locator('button[data-action="restart"]').click()
    expect(web0.locator(".pid")).not_to_have_text(first)
    expect(web0.locator(".state")).to_have_text("running")
    second = web0.locator(".pid").inner_text()
    assert second.isdigit() and second == str(svc.status("web-0")["web-0"]["pid"])
    expect(log).to_contain_text(f"hello from {second}")  # arrived live, without reloading

    # A program stopped by a signal is running and does nothing: the row says so, until SIGCONT.
    # (The page reads the figures every 5 s; refreshAll is that timer's own call, made now.)
    for sig, paused in ((signal.SIGSTOP, True), (signal.SIGCONT, False)):
        os.kill(int(second), sig)
        svc.wait_until(lambda p=paused: svc.status("web-0")["web-0"]["paused"] is p, 10, f"paused {paused}")
        page.evaluate("refreshAll()")
        reason = web0.locator(".reason")
        if paused:
            expect(reason).to_have_text("paused by a stop signal: send it CONT to resume")
        else:
            expect(reason).to_have_count(0)

    # The filter, and an action on a selection.
    page.fill("#filter", "idle")
    expect(page.locator("#instances tbody tr:visible")).to_have_count(1)
    page.locator('tr[data-name="idle"] input[type=checkbox]').check()
    page.click('[data-bulk="start"]')
    expect(page.locator('tr[data-name="idle"] .state')).to_have_text("running")
    assert svc.status("idle")["idle"]["state"] == "running"
    page.fill("#filter", "")
    expect(page.locator("#instances tbody tr:visible")).to_have_count(3)
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert not errors, errors

    # Dark, and phone-width: the page still fits and reads.
    phone = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark")
    small = phone.new_page()
    small.context.add_cookies(context.cookies())
    small.goto(url.split("?")[0])
    expect(small.locator("#instances tbody tr")).to_have_count(3)
    width = small.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width}px wide on a 390px screen"
    background = small.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(21, 23, 26)", background
    small.screenshot(path=str(tmp_path / "dashboard-phone-dark.png"), full_page=True)
    phone.close()

    # The URL's token was spent by the first browser: a second one is turned away.
    other = browser.new_context()
    answer = other.new_page().goto(url)
    assert answer is not None and answer.status == 401
    other.close()
    context.close()


def test_the_tcp_listener_serves_the_page_behind_its_token(service: Start, tmp_path: Path) -> None:
    token = "dash-token"
    manifest, port = with_tcp_listener(
        tmp_path,
        token,
        """
      one: {command: ["sleep", "300"]}
        """,
    )
    service(manifest)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as tcp:
        assert tcp.get("/").status_code == 401
        assert tcp.get("/", params={"token": "wrong"}).status_code == 401
        exchange = tcp.get("/", params={"token": token})
        assert exchange.status_code == 303 and exchange.headers["location"] == "/"
        cookie = exchange.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and token not in cookie
        page = tcp.get("/")  # the client kept the cookie
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert tcp.get("/web/dashboard.js").headers["content-type"].startswith("text/javascript")
        assert tcp.get("/v1/instances").json()[0]["name"] == "one"
        tcp.cookies.clear()
        tcp.cookies.set("procward_token", "0" * 64)
        assert tcp.get("/v1/instances").status_code == 401


def test_the_page_loads_nothing_from_elsewhere() -> None:
    from importlib import resources

    web = resources.files("supervisor.web")
    for name in ("index.html", "dashboard.css", "dashboard.js"):
        text = web.joinpath(name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), name
    assert "prefers-color-scheme: dark" in web.joinpath("dashboard.css").read_text()


def test_the_dashboard_proxy_lets_in_one_browser_and_bounds_requests(
    dashboard: tuple[ServiceProcess, str],
) -> None:
    svc, url = dashboard
    base, _, token = url.partition("/?token=")
    with httpx.Client(base_url=base, timeout=10) as browser:
        assert browser.get("/").status_code == 401
        assert browser.get("/v1/health").status_code == 401
        assert browser.get("/", params={"token": token + "x"}).status_code == 401
        exchange = browser.get("/", params={"token": token})
        assert exchange.status_code == 303 and exchange.headers["location"] == "/"
        cookie = exchange.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        # The cookie lets this client in; the token is spent.
        assert browser.get("/").headers["content-type"].startswith("text/html")
        assert browser.get("/v1/health").json()["pid"] == svc.pid
        assert "procward_instances 3" in browser.get("/metrics").text
        # A body over 1 MiB is refused on its declared length, before it is sent.
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            session = cookie.split(";")[0]
            raw.sendall(
                f"POST /v1/instances/stop HTTP/1.1\r\nHost: x\r\nCookie: {session}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {2 * 1024 * 1024}\r\n\r\n".encode()
            )
            assert raw.recv(65536).startswith(b"HTTP/1.1 413")
        chunked = browser.post("/v1/instances/stop", content=iter([b'{"all": true}']))
        assert chunked.status_code == 411
        stop = browser.post("/v1/instances/stop", json={"names": ["web-1"]})
        assert stop.status_code == 200 and stop.json()["ok"]
    with httpx.Client(base_url=base, timeout=10) as stranger:
        assert stranger.get("/", params={"token": token}).status_code == 401
    assert svc.status("web-1")["web-1"]["state"] == "stopped"


# -- the event stream refused: every place for a stream taken ------------------------------------

EVENTS = b"GET /v1/events HTTP/1.1\r\nHost: supervisor\r\n\r\n"
#: The page's first wait after a refusal: RETRY_FIRST_MS (10 s) in dashboard.js, ±10 %.
RETRY_EARLIEST_MS, RETRY_LATEST_MS = 9_000, 11_000
#: Where the page's clock starts, in seconds as Playwright's Python API takes it (any time: the
#: page shows times of day, never dates).
EPOCH = 1_900_000_000


def _open_event_streams(stack: ExitStack, path: Path, count: int) -> list[socket.socket]:
    """``count`` event streams on the service's socket, each accepted (its 200 head arrived: counted).

    Sent 50 at a time, under the listen backlog (128), as tests/test_api_stream_slots.py does.
    """
    opened: list[socket.socket] = []
    while len(opened) < count:
        batch = []
        for _ in range(min(50, count - len(opened))):
            sock = stack.enter_context(connect_unix(path, timeout=10))
            sock.sendall(EVENTS)
            batch.append(sock)
        for sock in batch:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(65536)
                assert chunk, f"the connection closed before an answer's head: {head!r}"
                head += chunk
            assert head.startswith(b"HTTP/1.1 200"), (len(opened), head)
            opened.append(sock)
    return opened


#: Records, on the page's clock, when the page makes each EventSource (the real one, unchanged).
OPENED_STREAMS = """
const RealEventSource = window.EventSource;
window.openedStreams = [];
window.EventSource = class extends RealEventSource {
  constructor(...args) { super(...args); window.openedStreams.push(Date.now()); }
};
"""


def test_a_refused_event_stream_is_said_and_tried_again_later(
    browser: Any, dashboard: tuple[ServiceProcess, str]
) -> None:
    """With every place for a stream taken, the page's EventSource is answered 503 and gives up
    for good: the badge said "reconnecting…" for ever. It says why, and the page asks again after
    10 s ±10 % (not at once, not never), and is live once a place is free.

    The page runs on Playwright's clock, paused: the refusal and its answer take real time, the
    back-off only the clock's. It is moved to just before the earliest retry (no new stream yet),
    then past the latest (one, whose request reaches the service and is live).
    """
    from playwright.sync_api import expect

    svc, url = dashboard
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    asked: list[str] = []  # the EventSource requests that reached the network
    page.on(
        "request",
        lambda request: asked.append(request.url)
        if request.resource_type == "eventsource" and request.url.endswith("/v1/events")
        else None,
    )
    page.clock.install(time=EPOCH)
    page.clock.pause_at(EPOCH + 1)  # from here, page time moves only when the test moves it
    page.add_init_script(OPENED_STREAMS)
    badge = page.locator("#connection")
    with ExitStack() as stack:
        streams = _open_event_streams(stack, svc.socket, MAX_STREAMS)
        assert svc.client().health()["streams"] == MAX_STREAMS
        page.goto(url)
        expect(badge).to_contain_text(
            "live updates refused: too many streams are open; close some tabs", timeout=20_000
        )
        expect(badge).to_contain_text("next try at")
        assert f"at most {MAX_STREAMS} at once" in (badge.get_attribute("title") or "")  # the service's words
        expect(page.locator("#instances tbody tr")).to_have_count(3)  # short requests answer all the same
        refused_at = page.evaluate("Date.now()")
        assert page.evaluate("window.openedStreams") == [refused_at] and len(asked) == 1, asked
        # Two places freed: the page's next try takes one, and not before its time.
        for sock in streams[:2]:
            sock.close()
        page.clock.run_for(RETRY_EARLIEST_MS - 100)
        assert page.evaluate("window.openedStreams") == [refused_at], "the page asked again too soon"
        expect(badge).to_contain_text("live updates refused")
        page.clock.run_for(RETRY_LATEST_MS - RETRY_EARLIEST_MS + 200)
        opened = page.evaluate("window.openedStreams")
        assert len(opened) == 2, opened
        assert RETRY_EARLIEST_MS <= opened[1] - opened[0] <= RETRY_LATEST_MS, opened
        expect(badge).to_have_text("live", timeout=20_000)
        svc.wait_until(
            lambda: svc.client().health()["streams"] == MAX_STREAMS - 1, 20, "the page's stream open"
        )
    assert len(asked) == 2, asked
    assert not errors, errors
    context.close()
