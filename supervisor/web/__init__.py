"""The dashboard's static files (HTML, CSS, one JavaScript file), served by ``supervisor.api.web``.

Package data, not code: nothing to build, nothing fetched from elsewhere.
"""
