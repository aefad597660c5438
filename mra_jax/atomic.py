"""Write a directory completely or not at all."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator


def _remove_stale(out: pathlib.Path) -> None:
    """Remove temporary folders for ``out`` left by processes that no longer run (e.g. killed mid-write)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*-*"):
        pid = tmp.name.removeprefix(f".{out.name}.tmp-").split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (PermissionError, OverflowError):
            continue


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, force: bool = False) -> Iterator[pathlib.Path]:
    """Yield a temporary directory beside ``out`` and move it to ``out`` only if the block succeeds.

    An existing ``out`` raises `FileExistsError` unless ``force``, in which case it is replaced only after the new
    content is complete. On any error the temporary directory is removed and ``out`` is left as it was.
    """
    out = pathlib.Path(out).absolute()
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass force=True (--force) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a checkpoint gets the usual permissions
    try:
        yield tmp
        if out.exists():
            if not force:
                raise FileExistsError(f"{out} appeared while it was being written; pass force=True to replace it")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)  # put the previous content back
                raise
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
