"""Applications on top of the library (photo search and captioning: ``mammut index``,
``search``, ``serve``). ``register_commands(subparsers)`` adds their CLI commands; each sets
``handler`` (``args -> exit code``) with ``set_defaults``. This module imports only argparse:
a command's dependencies load when it runs."""

from __future__ import annotations

import argparse

__all__ = ["register_commands"]


def register_commands(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the application commands to ``mammut``'s subparsers."""
    return None
