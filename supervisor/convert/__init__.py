"""Import foreign process configs as manifests, and export manifests to systemd and Kubernetes.

Each format is one module with a pure function from text to text plus notes
(:class:`Note`: what was dropped or approximated, and where). Nothing in the
core imports this package; it imports only ``supervisor.config``.
"""

from .notes import Converted, ConvertError, Exported, Note, read_source

__all__ = ["ConvertError", "Converted", "Exported", "Note", "read_source"]
