"""Write a directory completely or not at all, and replace only what is a checkpoint."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Iterator

# What makes a directory a model checkpoint (this project's Orbax layout, or transformers' files); files that
# may sit beside them in one (tokenizers, generation configs, READMEs) do not matter.
CHECKPOINT_MARKERS = ("params", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")
_RENAME_EXCHANGE = 2  # linux/fs.h


def is_replaceable(out: pathlib.Path) -> bool:
    """An empty directory, or a checkpoint: ``config.json`` with weights (``params/`` or HF weight files)."""
    if not out.is_dir() or out.is_symlink():
        return False
    names = {p.name for p in out.iterdir()}
    return not names or ("config.json" in names and any(m in names for m in CHECKPOINT_MARKERS))


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _remove_stale(out: pathlib.Path) -> None:
    """Clean up after processes that died while writing ``out``: remove their temporary folders, and for a replace
    cut between its two renames, put the previous ``out`` back (or drop it if a newer ``out`` is in place)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*-*"):
        pid = tmp.name.removeprefix(f".{out.name}.tmp-").split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
    for old in out.parent.glob(f".{out.name}.old-*"):
        pid = old.name.removeprefix(f".{out.name}.old-")
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(pid):
            continue
        if out.exists():
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            old.rename(out)


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Swap ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS or file system
    has no such call."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def _replace(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Put ``tmp`` at ``out`` (which exists): atomically where possible, else by two renames whose interruption
    the next write repairs (`_remove_stale`)."""
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)  # put the previous content back
        raise
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def move_into_place(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Put the complete directory ``tmp`` at ``out``, replacing an existing ``out`` (`_replace`: atomically where
    the OS can) — the caller has decided that it may."""
    if out.exists() or out.is_symlink():
        _replace(tmp, out)
    else:
        tmp.rename(out)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, force: bool = False) -> Iterator[pathlib.Path]:
    """Yield a temporary directory beside ``out`` and move it to ``out`` only if the block succeeds.

    An existing ``out`` raises `FileExistsError` unless ``force``; with ``force`` only an empty directory or a
    checkpoint (`is_replaceable`) is replaced, and only after the new content is complete (in one atomic step on
    Linux). On any error the temporary directory is removed and ``out`` is left as it was.
    """
    out = pathlib.Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    _check_target(out, force)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a checkpoint gets the usual permissions
    try:
        yield tmp
        if (out.exists() or out.is_symlink()) and not force:
            raise FileExistsError(f"{out} appeared while it was being written; use --force (force=True) to "
                                  "replace it")
        if out.exists() or out.is_symlink():
            _check_target(out, force)
        move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_dir(out: str | os.PathLike, force: bool) -> None:
    """Refuse, before any work, an output directory that `atomic_directory` would refuse: one under a file, an
    existing one without ``force``, or with ``force`` one that is neither empty nor a checkpoint."""
    out = pathlib.Path(out).absolute()
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileExistsError(f"cannot write {out}: {parent} is a file, not a directory")
            break
    if out.parent.is_dir():
        _remove_stale(out)
    _check_target(out, force)


def _check_target(out: pathlib.Path, force: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise FileExistsError(f"{out} already exists; use --force (force=True) to replace it")
    if not is_replaceable(out):
        raise FileExistsError(f"{out} is not a checkpoint directory (config.json with model.safetensors, "
                              "pytorch_model.bin or params/) nor empty; refusing to replace it even with --force")


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> None:
    """``rows`` as JSON lines at ``path``, written aside and renamed into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)
