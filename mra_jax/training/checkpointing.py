"""Training checkpoints: an Orbax `CheckpointManager` holding parameters, optimizer state, step, data-iterator state
and the model's config, saved asynchronously; a step is visible only once complete. Saved per layer whatever the
state's layout (a stacked state, `mra_jax.stacked_layers`, is converted on save and restore).

Layout of ``<output_dir>/checkpoints/<step>/``: ``params/`` (the same PyTree as `save_pretrained`'s, so the step
directory loads with ``MraForMaskedLM.from_pretrained`` and ``scripts/export_to_hf.py``), ``opt_state/``,
``data/`` (grain iterator state, one file per process), ``meta/`` (step, seed), ``model_config/`` (HF's
config.json) and ``checksums/`` (sha256 of every array shard of ``params`` and ``opt_state``, by array and the
shard's global slice, as the primary process held them; hashed in the save's background work, which the step's
commit waits for; verified on restore wherever the restoring process holds a shard covering the slice, on any mesh,
so that bytes that changed on disk but still decode are refused). A step without checksums is refused unless
``allow_unverified``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from mra_jax import stacked_layers
from mra_jax.checkpoint import _flatten, _nest, _sha256, mismatched_shards
from mra_jax.configuration import MraConfig
from mra_jax.stacked_layers import key_path
from mra_jax.training.step import TrainState

MODEL_CONFIG_ITEM = "model_config"
CHECKSUMS_ITEM = "checksums"


def _addressable_shards(tree: Any) -> dict[str, dict[str, jax.Array | np.ndarray]]:
    """The addressable shards of every array in ``tree``: ``{array path: {global slice: shard data}}`` (one replica
    per slice)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not isinstance(leaf, jax.Array | np.ndarray):
            continue
        shards = leaf.addressable_shards if isinstance(leaf, jax.Array) else []
        parts = {}
        for index, data in [(shard.index, shard.data) for shard in shards] or [((), leaf)]:
            where = ",".join(f"{s.start or 0}:{dim if s.stop is None else s.stop}"
                             for s, dim in zip(index, leaf.shape, strict=False))
            parts.setdefault(where, data)
        out[jax.tree_util.keystr(path)] = parts
    return out


def _digests(shards: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {name: {where: _sha256(data) for where, data in parts.items()} for name, parts in shards.items()}


def shard_checksums(tree: Any) -> dict[str, dict[str, str]]:
    """sha256 of the bytes of each addressable shard of every array in ``tree``: ``{array path: {global slice:
    digest}}`` (replicas of one slice are hashed once)."""
    return _digests(_addressable_shards(tree))


class ChecksumsHandler(ocp.AsyncCheckpointHandler):
    """Orbax item handler writing `shard_checksums` of a tree, as ``ocp.args.JsonSave`` would (file ``metadata``),
    on the primary process. `async_save` takes the shards to host memory (the train step may donate the arrays
    next) and hashes them in Orbax's background commit, which the step's commit waits for: a committed step always
    has its checksums, and the training thread does not hash."""

    FILE = "metadata"

    async def async_save(self, directory: epath.Path, args: ChecksumsSave) -> list[ocp.future.Future]:
        if jax.process_index() != 0:
            return []
        shards = _addressable_shards(args.tree)
        for data in (d for parts in shards.values() for d in parts.values() if isinstance(d, jax.Array)):
            data.copy_to_host_async()
        # As Orbax's own transfer: a host copy on accelerators; on CPU a view, which keeps the buffer alive (a
        # donating step then allocates a new one).
        host = {name: {where: np.asarray(data) for where, data in parts.items()} for name, parts in shards.items()}

        async def write() -> None:
            (directory / self.FILE).write_text(json.dumps(_digests(host)))

        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="checksums")]

    def save(self, directory: epath.Path, args: ChecksumsSave) -> None:
        if jax.process_index() == 0:
            (directory / self.FILE).write_text(json.dumps(shard_checksums(args.tree)))

    def restore(self, directory: epath.Path, args: ChecksumsRestore | None = None) -> dict[str, dict[str, str]]:
        return json.loads((directory / self.FILE).read_text())


@ocp.args.register_with_handler(ChecksumsHandler, for_save=True)
@dataclasses.dataclass
class ChecksumsSave(ocp.args.CheckpointArgs):
    """Save the checksums of the shards of ``tree``'s arrays."""

    tree: Any


@ocp.args.register_with_handler(ChecksumsHandler, for_restore=True)
@dataclasses.dataclass
class ChecksumsRestore(ocp.args.CheckpointArgs):
    """Read the recorded checksums."""


def params_tree(params) -> dict:
    """Parameters (a pytree keyed by NNX path) -> the nested, string-keyed dict of `save_pretrained`."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return _nest({key_path(path): value for path, value in leaves})


def params_from_tree(tree: dict, like):
    """Inverse of `params_tree`, with the structure of ``like``."""
    flat = _flatten(tree)
    return jax.tree_util.tree_map_with_path(lambda path, _: flat[tuple(str(k) for k in key_path(path))], like)


def _unstacked(state: TrainState, depth: int) -> TrainState:
    return TrainState(state.step, *stacked_layers.unstack((state.params, state.opt_state), depth))


def _per_layer_fn(state: TrainState) -> Any:
    """A function taking states like ``state`` to the per-layer layout of checkpoints: the identity, or (stacked) one
    jitted unstacking onto the per-layer shardings, built once per run."""
    depth = stacked_layers.num_stacked_layers(state.params)
    if depth is None:
        return lambda s: s
    shardings = _unstacked(jax.tree.map(lambda x: x.sharding, state), depth)
    return jax.jit(lambda s: _unstacked(s, depth), out_shardings=shardings)


def unverified_message(step_dir: pathlib.Path) -> str:
    return (f"training checkpoint {step_dir} has no checksums ({CHECKSUMS_ITEM}/ is missing), so its content cannot "
            "be verified; pass --allow-unverified to use it anyway")


class TrainCheckpoints:
    """Asynchronous training checkpoints under ``directory``: the ``keep`` most recent ones, and with ``best_metric``
    also the best one by that metric (``best_mode`` "max" or "min") of the metrics given to `save`."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, best_metric: str | None = None,
                 best_mode: str = "max", allow_unverified: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        self.allow_unverified = allow_unverified
        self._per_layer = None  # states -> the per-layer layout, made at the first save
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        policy = checkpoint_managers.LatestN(n=keep)
        if best_metric is not None:
            policy = checkpoint_managers.AnyPreservationPolicy([policy, checkpoint_managers.BestN(
                get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1)])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=True,
                                               best_fn=None if best_metric is None else (lambda m: m[best_metric]),
                                               best_mode=best_mode)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(self, state: TrainState, data_iterator: Any, config: MraConfig, meta: dict[str, Any],
             metrics: dict[str, float] | None = None) -> None:
        """Start an asynchronous save of ``state`` at its step (returns once the arrays are copied to host memory;
        writing and hashing continue in the background)."""
        step = int(jax.device_get(state.step))
        if self._per_layer is None:
            self._per_layer = _per_layer_fn(state)
        state = self._per_layer(state)
        params = params_tree(state.params)
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave({**meta, "step": step}),
            **{MODEL_CONFIG_ITEM: ocp.args.JsonSave(config.to_dict()),
               CHECKSUMS_ITEM: ChecksumsSave({"params": params, "opt_state": state.opt_state})})
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, abstract: TrainState, shardings: TrainState,
                data_iterator: Any) -> tuple[TrainState, dict[str, Any]]:
        """The state at ``step`` placed on ``shardings``; sets ``data_iterator``'s position in place."""
        def target(x, s):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

        depth = stacked_layers.num_stacked_layers(abstract.params)
        stacked_shardings = shardings
        if depth is not None:  # restored per layer, then stacked
            abstract, shardings = (_unstacked(tree, depth) for tree in (abstract, shardings))

        params = jax.tree.map(target, abstract.params, shardings.params)
        opt_state = jax.tree.map(target, abstract.opt_state, shardings.opt_state)
        checked = (self.directory / str(step) / CHECKSUMS_ITEM).exists()
        if not checked and not self.allow_unverified:
            raise ValueError(unverified_message(self.directory / str(step)))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(params_tree(params)),
                opt_state=ocp.args.StandardRestore(opt_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
                meta=ocp.args.JsonRestore(),
                **({CHECKSUMS_ITEM: ChecksumsRestore()} if checked else {})))
        except Exception as e:  # Orbax / tensorstore / grain errors of damaged or truncated files
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            raise ValueError(f"training checkpoint {self.directory / str(step)} cannot be read ({reason}); resume "
                             "from another step (remove this one) or start afresh with --overwrite") from None
        if checked:
            self._verify(step, dict(restored[CHECKSUMS_ITEM]), {"params": restored.params,
                                                                 "opt_state": restored.opt_state})
        else:
            print(f"warning: {self.directory / str(step)} has no checksums; restored unverified, as asked",
                  file=sys.stderr)
        if restored.meta.get("step", step) != step:
            raise ValueError(f"training checkpoint {self.directory / str(step)} says it holds step "
                             f"{restored.meta['step']}: its items were moved from another step")
        state = TrainState(step=jax.device_put(jax.numpy.asarray(step, jax.numpy.int32), shardings.step),
                           params=params_from_tree(restored.params, abstract.params),
                           opt_state=restored.opt_state)
        if depth is not None:
            state = jax.jit(stacked_layers.stack, out_shardings=stacked_shardings, donate_argnums=0)(state)
        return state, dict(restored.meta)

    def _verify(self, step: int, recorded: dict, tree: Any) -> None:
        held = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
                if isinstance(leaf, jax.Array | np.ndarray)}
        missing = sorted(set(held) - set(recorded))
        if missing:
            raise ValueError(f"training checkpoint {self.directory / str(step)} has no checksums for "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}: it cannot be verified")
        bad = sorted(mismatched_shards(recorded, held))
        if bad:
            raise ValueError(f"training checkpoint {self.directory / str(step)} is corrupted: the content of "
                             f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} differs from the checksums "
                             f"written when it was saved; resume from another step (or remove this one)")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
