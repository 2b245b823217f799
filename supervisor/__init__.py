"""procward: an async multi-instance process supervisor."""
