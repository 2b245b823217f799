"""The control plane: HTTP/JSON over a unix socket (ARCHITECTURE.md, decision 8).

- ``client``: the stdlib-only client the CLI uses (it must import fast);
- ``models``: the wire models, the source of the OpenAPI document;
- ``server``: the routes, and ``serve_control``, which the service runs.

Nothing is imported here: ``supervisor status`` imports ``supervisor.api.client``
and must not pay for pydantic, FastAPI or hypercorn.
"""
