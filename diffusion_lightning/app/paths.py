"""The app's root: every file or folder the app reads or writes lies under it."""

from __future__ import annotations

import os
from pathlib import Path


def under_root(root: str | os.PathLike[str], path: str | os.PathLike[str], what: str = "path") -> Path:
    """``path`` (relative to ``root`` unless absolute), resolved, when it lies under ``root``.

    Symbolic links are resolved first, so a link under the root that points elsewhere is refused too.

    Raises:
        ValueError: When the resolved path is outside the resolved root.
    """
    base = Path(root).expanduser().resolve()
    given = Path(path).expanduser()
    resolved = (given if given.is_absolute() else base / given).resolve()
    if resolved != base and base not in resolved.parents:
        raise ValueError(
            f"{what}={os.fspath(path)!r} is outside the app's root {os.fspath(base)!r}; give a path under it."
        )
    return resolved


def relative(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> str:
    """``path`` relative to ``root`` (POSIX separators), as the app lists it."""
    return Path(os.path.relpath(path, Path(root).resolve())).as_posix()
