"""Every file the experiments write (reports, plots, metrics) is written atomically.

A run stopped half-way through a write (Ctrl-C, a full disk, a killed process) leaves the file as
it was before, never half of a new one: the bytes go to a temporary file in the same folder, which
then replaces the target with ``os.replace`` (atomic on POSIX and Windows within one file system).

    write_text(path, text)
    save_figure(fig, path)          # matplotlib, format from the suffix
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator

__all__ = ["replacing", "save_figure", "write_text"]


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix, so writers that infer the format
    from it still do); when the block ends without an exception it replaces ``path``, else it is
    removed and ``path`` is left as it was. The folder is made when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.partial"
                               f"{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:  # KeyboardInterrupt too: never leave the temporary file behind
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


def write_text(path: str | Path, text: str) -> Path:
    """``Path(path).write_text(text)``, atomically; returns the path."""
    with replacing(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def save_figure(fig, path: str | Path, **kwargs) -> Path:
    """``fig.savefig(path)``, atomically (the format is ``path``'s suffix); returns the path."""
    path = Path(path)
    with replacing(path) as temporary:
        fig.savefig(temporary, format=path.suffix.lstrip(".") or None, **kwargs)
    return path
