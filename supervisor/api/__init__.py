"""The control plane: HTTP/JSON over a unix socket (ARCHITECTURE.md, decision 8).

- ``client``: the stdlib-only client the CLI uses (it must import fast);
- ``models``: the wire models, the source of the OpenAPI document;
- ``server``: ``serve_control``, which the service runs: the app on every listener;
- ``http1``: the HTTP/1.1 server it runs them on (h11 and anyio); ``exchange``: one request's ASGI calls;
- ``app``: the routes (a starlette app); ``errors``: errors as JSON; ``inputs``: bodies and query
  parameters, validated by the models; ``openapi``: the document, built from the routes' declarations;
- ``actions``: start, stop and restart, run in the control plane's own task group;
- ``live``: the streaming answers (logs -f, events);
- ``listeners``: the sockets and the token file; ``auth``: the TCP listener's bearer-token check.

Nothing is imported here: ``supervisor status`` imports ``supervisor.api.client``
and must not pay for pydantic, starlette or the server.
"""
