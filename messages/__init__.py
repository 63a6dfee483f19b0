"""Every typed message between actors and every payload on the wire.

Importing the package builds msgspec's decoding tables for every message type at once:
msgspec builds them lazily on a type's first decode or convert, and two threads doing that
together for the same types can crash the interpreter (a segfault, seen when a fresh
node's two handlers decoded their first requests at the same moment).
"""

from __future__ import annotations

import importlib
import pkgutil

import msgspec


def _prepare() -> None:
    for module in pkgutil.iter_modules(__path__):
        loaded = importlib.import_module(f"{__name__}.{module.name}")
        for value in list(vars(loaded).values()):
            if (
                isinstance(value, type)
                and issubclass(value, msgspec.Struct)
                and value.__module__ == loaded.__name__
            ):
                msgspec.json.Decoder(value)  # builds (and keeps) the type's tables


_prepare()
