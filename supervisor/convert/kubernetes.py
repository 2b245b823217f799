"""Export a manifest as Kubernetes objects: a Deployment per entry (a Job for one-shot jobs).

The image is not in the manifest, so it is a flag. A dependency is waited for by an
init container that polls the other entry's http or tcp check through a Service
named after it; a dependency without such a check cannot be waited for, and a
note says so.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from ..config import AliveCheck, InstanceConfig, ReadyCheck
from .exportbase import Source, check_name
from .notes import ConvertError, Exported

_LOCAL = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
WAIT_IMAGE = "busybox:1.36"
_EXPANDED = re.compile(r"\$(?=[$(])")


def dns_name(name: str) -> str:
    """A manifest name as a DNS-1035 label (what Services, containers and Deployments all accept)."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return label if label[:1].isalpha() else f"x-{label}"[:63].rstrip("-")


def unexpanded(text: str) -> str:
    """``text`` as Kubernetes must be given it to pass it on unchanged.

    The kubelet expands ``$(NAME)`` in a container's command, args and env values (and in an
    exec probe's command) from the container's env, and reads ``$$`` as one ``$``; procward
    does neither, so a shell's ``$(date)`` or ``$$`` has to reach it as written. A ``$`` before
    ``(`` or another ``$`` is doubled; any other ``$`` Kubernetes already keeps as it is.
    """
    return _EXPANDED.sub("$$", text)


def _int_seconds(value: float, low: int = 1) -> int:
    return max(low, math.ceil(value))


class _Objects:
    def __init__(self, source: Source, name: str, image: str, wait_image: str) -> None:
        self.source = source
        self.name = name
        self.image = image
        self.wait_image = wait_image
        self.jobs = {
            dep
            for _, config in source.instances()
            for dep, edge in config.depends_on.items()
            if edge.condition == "completed"
        }
        self.services: dict[str, dict[str, Any]] = {}

    def labels(self, entry: str) -> dict[str, str]:
        return {"app.kubernetes.io/name": dns_name(entry), "app.kubernetes.io/part-of": dns_name(self.name)}

    def probe(self, entry: str, key: str, check: ReadyCheck | AliveCheck) -> dict[str, Any] | None:
        note = self.source.note
        probe: dict[str, Any] = {}
        if check.kind == "exec":
            probe["exec"] = {"command": [unexpanded(arg) for arg in check.argv]}
        elif check.kind == "http":
            assert check.http is not None
            url = urlsplit(check.http)
            get: dict[str, Any] = {
                "path": (url.path or "/") + (f"?{url.query}" if url.query else ""),
                "port": url.port or (443 if url.scheme == "https" else 80),
                "scheme": url.scheme.upper(),
            }
            if url.hostname not in _LOCAL:
                get["host"] = url.hostname
            probe["httpGet"] = get
            for extra in ("expect", "body"):
                if getattr(check, extra) is not None:
                    note(entry, (key, extra), "dropped", "Kubernetes passes any status from 200 to 399")
        elif check.kind == "tcp":
            host, port = check.address
            probe["tcpSocket"] = {"port": port, **({} if host in _LOCAL else {"host": host})}
        else:
            note(entry, (key,), "dropped", f"no {check.kind} probe in Kubernetes")
            return None
        probe["periodSeconds"] = _int_seconds(check.interval)
        probe["timeoutSeconds"] = _int_seconds(check.timeout)
        if check.initial_delay:
            probe["initialDelaySeconds"] = _int_seconds(check.initial_delay, 0)
        return probe

    def container(self, entry: str, config: InstanceConfig) -> dict[str, Any]:
        note = self.source.note
        argv = [unexpanded(arg) for arg in config.argv]
        container: dict[str, Any] = {"name": dns_name(entry), "image": self.image, "command": argv[:1]}
        if argv[1:]:
            container["args"] = argv[1:]
        env = config.environment({})
        if env:
            container["env"] = [{"name": k, "value": unexpanded(v)} for k, v in env.items()]
        if config.env_file:
            note(
                entry,
                ("env_file",),
                "approximated",
                "its values are copied into env (a ConfigMap would do too)",
            )
        if config.cwd:
            container["workingDir"] = config.cwd
        if config.ready is not None and (probe := self.probe(entry, "ready", config.ready)):
            probe["successThreshold"] = config.ready.success_threshold
            container["readinessProbe"] = probe
        if config.alive is not None and (probe := self.probe(entry, "alive", config.alive)):
            probe["failureThreshold"] = config.alive.failure_threshold
            container["livenessProbe"] = probe
        security: dict[str, Any] = {}
        for key, field in (("user", "runAsUser"), ("group", "runAsGroup")):
            value = getattr(config, key)
            if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
                security[field] = int(value)
            elif value is not None:
                note(entry, (key,), "dropped", "Kubernetes takes a numeric id (securityContext)")
        if security:
            container["securityContext"] = security
        limits = config.limits
        resources: dict[str, str] = {}
        if limits.cpu_quota is not None:
            resources["cpu"] = f"{round(limits.cpu_quota * 1000)}m"  # the same CFS quota, in millicores
        if limits.memory_max is not None:  # the same thing: the kernel's cap on the container's cgroup
            resources["memory"] = str(limits.memory_max)
            if limits.memory is not None:
                why = "a pod restarts on no RSS figure; the cap is memory_max"
                note(entry, ("limits", "memory"), "dropped", why)
        if resources:
            container["resources"] = {"limits": resources}
        if limits.memory is not None and limits.memory_max is None:
            container["resources"] = {"limits": {**resources, "memory": str(limits.memory)}}
            note(
                entry,
                ("limits", "memory"),
                "approximated",
                "resources.limits.memory is the kernel's cap (an OOM kill, then a restart), "
                "not a restart after memory_interval above it",
            )
        self._unmapped(entry, config)
        return container

    def _unmapped(self, entry: str, config: InstanceConfig) -> None:
        note = self.source.note
        written = self.source.written
        if config.umask is not None:
            note(entry, ("umask",), "dropped", "no umask in a pod spec: set it in the image's entrypoint")
        if config.stop.signal != 15:
            note(entry, ("stop", "signal"), "dropped", "Kubernetes stops a container with SIGTERM")
        if not config.stop.group:
            note(entry, ("stop", "group"), "dropped", "Kubernetes stops every process of the container")
        for which in ("stdin", "stdout", "stderr"):
            stream = getattr(config, which)
            if stream.kind not in ("log", "null", "stdout") and written(entry, which):
                note(
                    entry,
                    (which,),
                    "dropped",
                    f"a {stream.kind} stream: the container's output goes to its log",
                )
        for key in ("max_bytes", "backups", "timestamps", "stdout_file", "stderr_file"):
            if written(entry, "logs", key):
                note(entry, ("logs", key), "dropped", "the kubelet keeps and rotates container logs")
        for key in ("min_uptime", "backoff", "delay"):
            if written(entry, "restart", key):
                note(entry, ("restart", key), "dropped", "the kubelet's own back-off (10s doubling to 5m)")
        if config.watchdog is not None:
            note(entry, ("watchdog",), "dropped", "no sd_notify watchdog in Kubernetes: use an alive check")
        if not config.inherit_env and written(entry, "inherit_env"):
            note(entry, ("inherit_env",), "dropped", "a container starts from its image's environment")
        limits = config.limits
        for key in ("nice", "oom_score_adj", *limits.rlimits()):
            if written(entry, "limits", key):
                note(entry, ("limits", key), "dropped", "a pod spec sets no nice, oom_score_adj or rlimits")

    def _wait_for(self, entry: str, dep: str, condition: str) -> dict[str, Any] | None:
        """An init container polling ``dep``'s http or tcp check through its Service; None if it has none."""
        note = self.source.note
        other = self.source.manifest.instances[dep]
        if dep in self.jobs:
            note(
                entry, ("depends_on", dep), "dropped",
                f"no wait for a Job in a pod: apply {dns_name(dep)} first and "
                f"`kubectl wait --for=condition=complete job/{dns_name(dep)}`",
            )  # fmt: skip
            return None
        check = next(
            (c for c in (other.ready, other.alive) if c is not None and c.kind in ("http", "tcp")), None
        )
        if check is None:
            note(entry, ("depends_on", dep), "dropped", f"{dep} has no http or tcp check to wait for")
            return None
        host = dns_name(dep)
        if check.kind == "tcp":
            port = check.address[1]
            test = f"nc -z -w 2 {host} {port}"
        else:
            assert check.http is not None
            url = urlsplit(check.http)
            port = url.port or (443 if url.scheme == "https" else 80)
            rest = url.path + (f"?{url.query}" if url.query else "")
            test = f"wget -q -T 2 -O /dev/null '{url.scheme}://{host}:{port}{rest}'"
        self.services[dep] = {"port": port}
        if condition != "ready":
            note(
                entry,
                ("depends_on", dep),
                "approximated",
                f"{condition}: waits until {dep} answers its check",
            )
        return {
            "name": f"wait-{host}"[:63],
            "image": self.wait_image,
            "command": ["sh", "-c", unexpanded(f"until {test}; do echo waiting for {host}; sleep 1; done")],
        }

    def workload(self, entry: str, config: InstanceConfig) -> dict[str, Any]:
        note = self.source.note
        pod: dict[str, Any] = {"containers": [self.container(entry, config)]}
        waits = [
            w for dep, edge in config.depends_on.items() if (w := self._wait_for(entry, dep, edge.condition))
        ]
        if waits:
            pod["initContainers"] = waits
        pod["terminationGracePeriodSeconds"] = _int_seconds(config.stop.timeout, 0)
        meta = {"name": dns_name(entry), "labels": self.labels(entry)}
        template = {"metadata": {"labels": self.labels(entry)}, "spec": pod}
        if entry in self.jobs:
            pod["restartPolicy"] = "Never" if config.restart.policy == "no" else "OnFailure"
            spec: dict[str, Any] = {
                "completions": config.replicas,
                "parallelism": config.replicas,
                "backoffLimit": config.restart.max_restarts,
                "template": template,
            }
            if not config.autostart:
                spec["suspend"] = True
            return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}
        if config.restart.policy != "always":
            note(
                entry, ("restart", "policy"), "approximated", "a Deployment restarts its pods after any exit"
            )
        replicas = config.replicas
        if not config.autostart:
            replicas = 0
            note(entry, ("autostart",), "approximated", "replicas: 0 until scaled up")
        if self.source.written(entry, "restart", "max_restarts"):
            note(entry, ("restart", "max_restarts"), "dropped", "a Deployment never gives up")
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": self.labels(entry)},
                "template": template,
            },
        }

    def service(self, entry: str) -> dict[str, Any]:
        port = self.services[entry]["port"]
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": dns_name(entry), "labels": self.labels(entry)},
            "spec": {"selector": self.labels(entry), "ports": [{"port": port, "targetPort": port}]},
        }


def export(text: str, file: Path, *, name: str, image: str, wait_image: str = WAIT_IMAGE) -> Exported:
    """Kubernetes objects for the manifest ``text`` (read from ``file``): {file name: YAML documents}."""
    if not image.strip():
        raise ConvertError("--image", None, "give the container image, e.g. --image registry/app:1.0")
    source = Source(text, file)
    objects = _Objects(source, check_name(name), image, wait_image)
    seen: dict[str, str] = {}
    for entry, _ in source.instances():
        if dns_name(entry) in seen:
            raise ConvertError(
                file, None, f"{entry!r} and {seen[dns_name(entry)]!r} both become {dns_name(entry)!r}"
            )
        seen[dns_name(entry)] = entry
    documents: dict[str, list[dict[str, Any]]] = {
        entry: [objects.workload(entry, config)] for entry, config in source.instances()
    }
    for entry in objects.services:
        documents[entry].append(objects.service(entry))
    files = {
        f"{dns_name(entry)}.yaml": yaml.safe_dump_all(docs, sort_keys=False, width=1 << 20)
        for entry, docs in documents.items()
    }
    return Exported(files, source.sorted_notes())
