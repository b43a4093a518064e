"""The path below the mount point: one rule for the proxy, the middleware and the admin app.

An ASGI app mounted at ``/api`` gets ``root_path="/api"`` and a ``path`` that still starts with
it (ASGI 3; Starlette's ``Mount`` and uvicorn's ``--root-path`` both do so). The part below is
what the app routes on. The prefix ends at a segment boundary: ``/api`` and ``/api/x`` are below
``/api``, ``/apiary`` is not. A path that is not below its ``root_path`` is taken whole.
"""

from __future__ import annotations

from asgi_leasttime.types import Scope

__all__ = ["below", "path_below_root", "raw_below"]


def below(path: str, root: str) -> str | None:
    """``path`` without the prefix ``root`` (``"/"`` for ``root`` itself), or ``None`` when
    ``path`` is not at or under ``root`` at a segment boundary. A trailing ``/`` of ``root``
    counts as the boundary."""
    if not path.startswith(root):
        return None
    rest = path[len(root) :]
    if not rest:
        return "/"
    if rest[0] == "/":
        return rest
    if root[-1:] == "/":
        return "/" + rest
    return None


def path_below_root(scope: Scope) -> str:
    """The scope's ``path`` below its ``root_path``, starting with ``/``; the whole ``path`` when
    it is not under ``root_path`` (``root_path="/api"`` leaves ``/apiary`` as it is)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if not root_path:
        return path
    rest = below(path, root_path)
    return path if rest is None else rest


def raw_below(raw_path: bytes, root: bytes) -> bytes | None:
    """:func:`below` for a ``raw_path`` and the encoded ``root_path``."""
    if not raw_path.startswith(root):
        return None
    rest = raw_path[len(root) :]
    if not rest:
        return b"/"
    if rest[:1] == b"/":
        return rest
    if root[-1:] == b"/":
        return b"/" + rest
    return None
