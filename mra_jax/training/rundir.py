"""Run directories, shared by pretraining and fine-tuning: the checks of a start on an existing ``output_dir``, the
history of each start's config, and a fresh start that moves the earlier run aside.

An ``output_dir`` holds one run, of one kind (pretraining or fine-tuning); a non-empty directory that holds no run
is refused, as is a run whose results (metrics, export) remain but whose checkpoints are gone. Started again, a run
resumes from its latest checkpoint, and only the keys of
`SAFE_ON_RESUME` may differ from the resolved config of its latest start (keys that config lacks, from older
versions, are not compared); ``steps`` must lie above the latest checkpoint. The first start's resolved config is
``config.yaml``, the n-th start's ``config.<n>.yaml`` beside it (an earlier one is never overwritten). With
``overwrite`` the directory is first renamed ``<output_dir>.old-<UTC time>`` and the run starts afresh.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime
import functools
import logging
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from omegaconf import OmegaConf

SAFE_ON_RESUME = ("output_dir", "steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                  "progress_bar", "tensorboard", "export_hf", "mesh", "distributed", "data.num_threads",
                  "data.eval_batches", "attention", "remat", "scan_layers")
"""Keys, and prefixes of keys (``mesh`` covers ``mesh.data``), that may change when a run resumes: how often it
logs, evaluates and saves, how far it goes, and how it is laid out on devices (checkpoints restore resharded)."""

T = TypeVar("T")
CONFIG = "config.yaml"
_LATER_CONFIG = re.compile(r"config\.(\d+)\.yaml")


@dataclasses.dataclass(frozen=True)
class RunStart:
    """What a start found in ``directory``: its checkpoints' steps and its starts' configs (first to latest);
    ``moved_to``: where an overwritten earlier run went."""

    directory: pathlib.Path
    checkpoint_steps: tuple[int, ...] = ()
    configs: tuple[pathlib.Path, ...] = ()
    moved_to: pathlib.Path | None = None
    lock: Any = None  # the open lock file: the lock holds while this object (or the process) lives

    @property
    def latest_step(self) -> int | None:
        return self.checkpoint_steps[-1] if self.checkpoint_steps else None


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The steps of the complete checkpoints in ``directory`` (read only: nothing is created or cleaned up)."""
    directory = pathlib.Path(directory).absolute()
    if not directory.is_dir():
        return []
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # a read-only manager warns of the options it sets
    try:
        with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
            return sorted(manager.all_steps())
    finally:
        absl.setLevel(level)


def recorded_configs(directory: pathlib.Path) -> list[pathlib.Path]:
    """The resolved configs of the starts of the run in ``directory``, first to latest."""
    later = sorted((int(m[1]), p) for p in directory.glob("config.*.yaml") if (m := _LATER_CONFIG.fullmatch(p.name)))
    first = [directory / CONFIG] if (directory / CONFIG).is_file() else []
    return first + [p for _, p in later]


def flat_config(config: Any) -> dict[str, Any]:
    """A config (a dataclass, or a YAML file's path) as ``{dotted key: value}``; lists are values."""
    node = OmegaConf.load(config) if isinstance(config, pathlib.Path) else OmegaConf.structured(config)
    out: dict[str, Any] = {}

    def walk(tree: Mapping[str, Any], prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(node), "")
    return out


def is_safe_on_resume(key: str) -> bool:
    return any(key == safe or key.startswith(f"{safe}.") for safe in SAFE_ON_RESUME)


def refused_changes(recorded: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"key old -> new"`` for each key of both configs that differs and may not change on resume."""
    return [f"{key} {recorded[key]!r} -> {value!r}" for key, value in new.items()
            if key in recorded and recorded[key] != value and not is_safe_on_resume(key)]


def take_lock(directory: pathlib.Path) -> Any:
    """An exclusive lock on the run in ``directory`` (``.<name>.lock`` beside it, holding ``pid@host``), held until the
    returned file is closed or the process ends; `ValueError` naming the holder if another run has it."""
    import fcntl
    import socket

    path = directory.with_name(f".{directory.name}.lock")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        if directory.is_dir() and not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(f"{directory} is not writable")
        handle = open(path, "a+")  # noqa: SIM115  (kept open: the lock lives as long as the file)
    except PermissionError as e:
        raise ValueError(f"cannot write the run into {directory}: permission denied ({e.filename or e})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(f"{directory} is in use by another run ({holder}, lock {path}); wait for it to end or use "
                         "another output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    held = _HELD.get()
    if held is not None:
        held.append(handle)
    return handle


_HELD: contextvars.ContextVar[list | None] = contextvars.ContextVar("mra_jax_run_locks", default=None)


def releases_locks(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a run: the locks it takes (`take_lock`) are released when it returns or raises."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        held: list = []
        token = _HELD.set(held)
        try:
            return fn(*args, **kwargs)
        finally:
            _HELD.reset(token)
            for handle in held:
                handle.close()

    return wrapper


def move_aside(directory: pathlib.Path) -> pathlib.Path:
    """Rename ``directory`` to ``<directory>.old-<UTC time>`` (nothing is deleted); returns the new path."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = directory.with_name(f"{directory.name}.old-{stamp}")
    n = 1
    while target.exists():
        target, n = directory.with_name(f"{directory.name}.old-{stamp}-{n}"), n + 1
    return directory.rename(target)


def start(cfg: Any, output_dir: str | os.PathLike, *, overwrite: bool = False, primary: bool = True) -> RunStart:
    """Check that ``cfg`` (a run config with ``steps``) may start in ``output_dir``, before anything is written (but
    the lock file beside it); refusals are one-line `ValueError`s. Run on every process; the primary one takes the
    run's lock (`take_lock`: a second run on the same directory is refused) and says where the run starts.

    ``overwrite``: the primary process moves a non-empty ``output_dir`` aside (`move_aside`) and the run starts
    afresh; every process waits for the move."""
    directory = pathlib.Path(output_dir).absolute()
    lock = take_lock(directory) if primary else None
    try:
        return _checked_start(cfg, directory, overwrite, primary, lock)
    except BaseException:
        if lock is not None:  # a refused start holds nothing (its traceback may outlive it)
            lock.close()
        raise


def _checked_start(cfg: Any, directory: pathlib.Path, overwrite: bool, primary: bool, lock: Any) -> RunStart:
    if overwrite:
        moved = None
        if primary and directory.is_dir() and any(directory.iterdir()):
            moved = move_aside(directory)
            print(f"--overwrite: moved the earlier run {directory} aside to {moved}; starting afresh", flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("mra_jax.rundir.overwrite")
        return RunStart(directory, moved_to=moved, lock=lock)
    steps = tuple(checkpoint_steps(directory / "checkpoints"))
    configs = tuple(recorded_configs(directory))
    hint = "use another output_dir, or --overwrite to move the earlier run aside and start afresh"
    recorded_kind = _recorded_kind(configs[0]) if configs else None
    if recorded_kind == "unknown" or (not configs and directory.is_dir() and any(directory.iterdir())):
        raise ValueError(f"{directory} is not empty and holds no run of mra-jax ({CONFIG} of a pretraining or "
                         f"fine-tuning run): a run would write over its files; "
                         f"{hint.replace('the earlier run', 'it')}")
    kind = run_kind(flat_config(cfg))
    if configs and recorded_kind != kind:
        raise ValueError(f"{directory} holds a {recorded_kind} run; a {kind} run needs its own output_dir")
    if configs and not steps and _has_results(directory):
        raise ValueError(f"{directory} holds a run with results ({', '.join(_has_results(directory))}) but no "
                         f"checkpoint to resume from: starting again would replace them; {hint}")
    if configs:
        changes = refused_changes(flat_config(configs[-1]), flat_config(cfg))
        if changes:
            raise ValueError(f"{directory} holds a run whose config ({configs[-1].name}) differs in keys that cannot "
                             f"change on resume: {'; '.join(changes)}; {hint}")
    if steps and cfg.steps <= steps[-1]:
        raise ValueError(f"steps={cfg.steps} is not above the latest checkpoint of {directory} (checkpoint steps: "
                         f"{', '.join(map(str, steps))}); pass steps > {steps[-1]} to continue, or {hint}")
    if jax.process_count() > 1:  # every process has checked the directory before the primary writes into it
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mra_jax.rundir.start")
    if primary and steps:
        print(f"resuming {directory} from step {steps[-1]} (checkpoint steps: {', '.join(map(str, steps))})",
              flush=True)
    elif primary and configs:
        print(f"{directory} holds no checkpoint yet: starting again from step 0", flush=True)
    return RunStart(directory, steps, configs, lock=lock)


KINDS = {"task": "fine-tuning", "mlm_probability": "pretraining"}
"""A key only one kind of run has -> that kind."""


def run_kind(flat: Mapping[str, Any]) -> str:
    """"pretraining" or "fine-tuning", by the keys of a (flat) config."""
    return next((kind for key, kind in KINDS.items() if key in flat), "unknown")


def _recorded_kind(path: pathlib.Path) -> str:
    try:
        return run_kind(flat_config(path))
    except Exception:  # not a YAML mapping: not a run's config
        return "unknown"


def _has_results(directory: pathlib.Path) -> list[str]:
    """What a run with no checkpoint left would overwrite: logged metrics, an HF export."""
    metrics = directory / "metrics.jsonl"
    return [name for name, present in (("metrics.jsonl", metrics.is_file() and metrics.stat().st_size > 0),
                                       ("hf/", (directory / "hf").exists())) if present]


def record_config(directory: pathlib.Path, text: str) -> pathlib.Path:
    """Write a start's resolved config: ``config.yaml`` at the first start, else ``config.<n>.yaml`` (n = the
    start's number); returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    configs = recorded_configs(directory)
    numbers = [int(m[1]) for p in configs if (m := _LATER_CONFIG.fullmatch(p.name))]
    path = directory / (f"config.{max(numbers, default=1) + 1}.yaml" if configs else CONFIG)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
    return path
