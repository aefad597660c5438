"""Orbax checkpoints of model parameters: ``<dir>/config.json`` and ``<dir>/params`` (an Orbax PyTree).

The parameters are stored as a nested dict that mirrors the model's attribute paths (``mra/encoder/layer/0/...``),
in NNX layout (Linear kernels ``[in, out]``), independent of any mesh: restore them onto any sharding.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from mra_jax.configuration import CONFIG_FILES
from mra_jax.conversion.hf_names import hf_name
from mra_jax.conversion.loading import Path, Request

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
CHECKSUMS_FILE = "checksums.json"  # sha256 of each array's bytes, written by `save_params`, verified on load
TRAINING_CHECKSUMS = "checksums/metadata"  # a training checkpoint's sha256 per array shard (training.checkpointing)
TRAINING_ONLY_ITEM = "opt_state"  # what marks a step of a training run


def _sha256(value: jax.Array | np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(value)).reshape(-1).view(np.uint8)).hexdigest()


def _region(where: str) -> tuple[slice, ...]:
    """A shard's global slice as recorded (``"0:4,0:64"``; ``""`` for a scalar) -> slices."""
    return tuple(slice(int(a), int(b)) for a, b in (part.split(":") for part in where.split(","))) if where else ()


def mismatched_shards(recorded: dict[str, dict[str, str]], held: dict[str, jax.Array | np.ndarray]) -> list[str]:
    """The names of ``held``'s arrays whose bytes differ from a recorded sha256 ``{name: {global slice: digest}}``.

    A recorded slice is checked wherever this process holds a shard that contains it (the whole array, or the shard
    of another mesh that covers it), so arrays restored on any sharding are verified against any saved one.
    """
    bad = []
    for name, value in held.items():
        shards = ([(shard.index, shard.data) for shard in value.addressable_shards] if isinstance(value, jax.Array)
                  else [((), value)])
        for where, digest in recorded.get(name, {}).items():
            region = _region(where)
            for index, data in shards:
                index = tuple(index) + (slice(None),) * (len(region) - len(index))
                starts = [0 if i.start is None else i.start for i in index]
                stops = [dim if i.stop is None else i.stop for i, dim in zip(index, value.shape, strict=True)]
                if all(lo <= r.start and r.stop <= hi for r, lo, hi in zip(region, starts, stops, strict=True)):
                    local = tuple(slice(r.start - lo, r.stop - lo) for r, lo in zip(region, starts, strict=True))
                    if _sha256(np.asarray(data)[local]) != digest:
                        bad.append(name)
                    break
            if bad and bad[-1] == name:
                break
    return bad


def is_orbax_checkpoint(directory: str | os.PathLike) -> bool:
    """``params/`` and a config: `save_pretrained`'s output, or a step of a training run's checkpoints."""
    directory = pathlib.Path(directory)
    return (directory / PARAMS_DIR).is_dir() and any((directory / f).is_file() for f in CONFIG_FILES)


def _nest(flat: dict[Path, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = value
    return tree


def _flatten(tree: dict, prefix: Path = ()) -> dict[Path, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def save_params(directory: str | os.PathLike, params: dict[Path, jax.Array | np.ndarray]) -> None:
    """Write ``{path: array}`` as an Orbax PyTree at ``directory/params``, synchronously.

    Orbax buffers the encoded bytes of every array in flight; limiting that to the largest array keeps the peak
    memory of a save near one copy of the parameters instead of two.
    """
    largest = max(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in params.values())
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=max(largest, 2**26) * 1.01 / 1e9)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(pathlib.Path(directory).absolute() / PARAMS_DIR, args=ocp.args.PyTreeSave(_nest(params)))
    if jax.process_count() == 1:  # Orbax stores no checksum: keep one per array to catch corruption that stays finite
        sums = {"/".join(map(str, path)): {"sha256": _sha256(v), "dtype": str(np.dtype(v.dtype))}
                for path, v in params.items()}
        (pathlib.Path(directory) / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=1, sort_keys=True) + "\n")


class _NoItemMetadataWarning(logging.Filter):
    """Orbax warns that ``_CHECKPOINT_METADATA`` is missing when it reads one item of a `CheckpointManager` step
    (a training checkpoint's ``params``): that file lives a level up, and nothing is wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Metadata file does not exist" not in record.getMessage()


@contextlib.contextmanager
def _quiet_item_metadata() -> Iterator[None]:
    logger, quiet = logging.getLogger("absl"), _NoItemMetadataWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class OrbaxSource:
    """The parameters of an Orbax checkpoint seen as HF-named tensors (see `mra_jax.conversion.loading`)."""

    def __init__(self, directory: str | os.PathLike, architecture: str | None, verify: bool = True):
        self.directory = pathlib.Path(directory).absolute() / PARAMS_DIR
        self.description = str(directory)
        self.architecture = architecture
        self.verify = verify
        step = self.directory.parent
        if verify and (step / TRAINING_ONLY_ITEM).is_dir() and not (step / TRAINING_CHECKSUMS).is_file():
            raise ValueError(f"training checkpoint {step} has no checksums ({TRAINING_CHECKSUMS} is missing), so its "
                             "content cannot be verified; pass --allow-unverified (verify=False) to use it anyway")
        try:
            with _quiet_item_metadata():
                metadata = ocp.StandardCheckpointer().metadata(self.directory).item_metadata
        except Exception as e:
            raise ValueError(f"cannot read Orbax checkpoint {self.directory}: {e}") from e
        if not metadata:
            absent = [name for name in ("_METADATA", "manifest.ocdbt", "d") if not (self.directory / name).exists()]
            why = f"missing {', '.join(absent)}" if absent else "its metadata cannot be read (damaged files)"
            raise ValueError(f"cannot read Orbax checkpoint {self.directory}: {why}; the checkpoint is incomplete "
                             "or damaged")
        self.paths = {hf_name(path): path for path in _flatten(dict(metadata))}
        shapes = {path: tuple(meta.shape) for path, meta in _flatten(dict(metadata)).items()}
        self.shapes = {name: tuple(reversed(shapes[path])) if path[-1] == "kernel" else shapes[path]
                       for name, path in self.paths.items()}

    def _damaged(self, requests: list[Request]) -> str:
        """Which tensors cannot be restored (tried one by one, after a failed restore of all), and why."""
        bad = []
        for name, _, target in requests:
            item = _nest({self.paths[name]: target})
            args = _nest({self.paths[name]: ocp.ArrayRestoreArgs(dtype=target.dtype, sharding=(
                target.sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])))})
            try:
                with _quiet_item_metadata():
                    ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
                        self.directory, args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                                    partial_restore=True))
            except Exception as e:
                reason = str(e).splitlines()[0].split(". See full")[0][:100] if str(e) else type(e).__name__
                bad.append(f"{name} ({reason})")
        if not bad:
            return "the restore failed, although every tensor restores on its own"
        return (f"{len(bad)} tensor(s) cannot be read (a data file is truncated, damaged or missing): "
                + "; ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))

    def read(self, requests: list[Request]) -> Iterator[tuple[Path, jax.Array]]:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        item = _nest({self.paths[name]: target for name, _, target in requests})
        restore_args = _nest({self.paths[name]: ocp.ArrayRestoreArgs(dtype=target.dtype,
                                                                      sharding=target.sharding or default)
                              for name, _, target in requests})
        try:
            with _quiet_item_metadata():
                restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
                    self.directory, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                partial_restore=True))
        except Exception as e:
            raise ValueError(f"cannot restore Orbax checkpoint {self.directory}: {self._damaged(requests)}") from e
        flat = _flatten(restored)
        self._verify(flat, requests)
        for name, path, _ in requests:
            yield path, flat[tuple(str(p) for p in self.paths[name])]

    def _verify(self, flat: dict, requests: list[Request]) -> None:
        """Compare the restored arrays with the checksums written at save time: a training checkpoint's per shard
        (required), `save_params`' per array (where there are some)."""
        if not self.verify:
            return
        training = self.directory.parent / TRAINING_CHECKSUMS
        if training.is_file():
            try:
                recorded = json.loads(training.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"{training} is unreadable: {e}") from e
            names = {jax.tree_util.keystr(tuple(jax.tree_util.DictKey(str(k)) for k in (PARAMS_DIR, *self.paths[n]))):
                     n for n, _, _ in requests}  # as the training checkpoint names them
            held = {key: flat[tuple(str(p) for p in self.paths[name])] for key, name in names.items()}
            bad = [names[k] for k in held if k not in recorded] + [names[k] for k in mismatched_shards(recorded, held)]
            if bad:
                raise ValueError(f"training checkpoint {self.directory.parent} is corrupted: the content of "
                                 f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''} differs from the checksums "
                                 f"recorded when it was saved ({TRAINING_CHECKSUMS})")
            return
        checksums = self.directory.parent / CHECKSUMS_FILE
        if not checksums.is_file() or jax.process_count() > 1:
            return
        try:
            sums = json.loads(checksums.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{checksums} is unreadable: {e}") from e
        bad = []
        for name, _, _ in requests:
            key = tuple(str(p) for p in self.paths[name])
            recorded, value = sums.get("/".join(key)), flat[key]
            if recorded and recorded["dtype"] == str(np.dtype(value.dtype)) and _sha256(value) != recorded["sha256"]:
                bad.append(name)
        if bad:
            raise ValueError(f"Orbax checkpoint {self.directory.parent} is corrupted: the content of "
                             f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''} differs from the checksum "
                             f"recorded when it was saved ({CHECKSUMS_FILE})")
