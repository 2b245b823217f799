"""What crosses from one run of the service to the next: the re-exec state and the crash record.

``state.py`` carries a live service's state across a re-exec; ``record.py`` keeps the
record of running process groups a service that crashed leaves behind, and
``leftovers.py`` stops what that record names at the next start. Import the
modules themselves: this package imports nothing, so ``supervisor status`` pays for none.
"""
