"""`RuntimeOptions`: how a model runs (attention implementation, mesh, remat), apart from `MraConfig`.

`MraConfig` stays HF's ``config.json``; these choices belong to a run and are given to a model at construction
(``MraForMaskedLM(config, rngs=..., options=...)``) or to ``from_pretrained(..., options=...)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mra_jax.sharding import partition_spec

IMPLEMENTATIONS = (None, "reference", "pallas", "pallas_gpu", "pallas_tpu", "dense")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
"""Compute / storage dtypes by the names configs and scripts use."""
PLATFORMS = (None, "cpu", "gpu", "tpu")
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """Run-time choices of a model.

    Attributes:
      implementation: the attention: ``None`` (best for the platform: Pallas kernels on GPU/TPU, jnp reference on
        CPU), ``"reference"``, ``"pallas"`` (the platform's kernels), ``"pallas_gpu"`` / ``"pallas_tpu"`` (one kernel
        family; interpreted off its platform), or ``"dense"`` (plain softmax attention through
        ``jax.nn.dot_product_attention`` — not MRA; a baseline for benchmarks).
      platform: the platform whose kernels to use (``"gpu"``, ``"tpu"``, ``"cpu"``); ``None`` = the default backend.
        Set it when compiling ahead of time for another platform (e.g. a TPU topology from a CPU machine).
      mesh: with a mesh, the attention runs under ``jax.shard_map`` (batch over ``batch_axes``, heads over
        ``head_axis``) and hidden states are constrained to be sharded on batch.
      batch_axes, head_axis: mesh axes of the batch and of the heads (axes missing from the mesh are skipped).
      remat: per-layer rematerialisation: ``"none"``, ``"full"`` (save only the layer inputs) or ``"dots"`` (save
        the outputs of matmuls without batch dimensions, recompute the rest).
      scan_layers: run the layers under one ``jax.lax.scan`` (their parameters stacked inside the call, or held
        stacked by a training state: `mra_jax.stacked_layers`): compile time independent of depth. Same results as
        the Python loop.
      param_rules: with a mesh, the parameters' sharding rules (`mra_jax.sharding.RULES`); under the scan, each
        layer's parameters and their gradients are constrained to them (as the loop's per-layer arrays are placed).
    """

    implementation: str | None = None
    platform: str | None = None
    mesh: Mesh | None = None
    batch_axes: tuple[str, ...] = ("data", "fsdp")
    head_axis: str | None = "tensor"
    remat: str = "none"
    scan_layers: bool = False
    param_rules: str | Mapping[str, str | None] | None = None

    def __post_init__(self) -> None:
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}")
        if self.platform not in PLATFORMS:
            raise ValueError(f"platform must be one of {PLATFORMS}, got {self.platform!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if isinstance(self.batch_axes, str):
            object.__setattr__(self, "batch_axes", (self.batch_axes,))
        object.__setattr__(self, "batch_axes", tuple(self.batch_axes))

    @property
    def mesh_batch_axes(self) -> tuple[str, ...]:
        """The batch axes that the mesh has."""
        return tuple(a for a in self.batch_axes if self.mesh is not None and a in self.mesh.axis_names)

    @property
    def mesh_head_axis(self) -> str | None:
        if self.mesh is None or self.head_axis not in self.mesh.axis_names:
            return None
        return self.head_axis

    def batch_sharding(self, ndim: int) -> NamedSharding | None:
        """Sharding of an activation ``[batch, ...]`` of rank ``ndim`` (``None`` without a mesh)."""
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, PartitionSpec(self.mesh_batch_axes or None, *(None,) * (ndim - 1)))

    def constrain_batch(self, x: jax.Array) -> jax.Array:
        """``x`` constrained to be sharded on its leading (batch) axis; unchanged without a mesh."""
        sharding = self.batch_sharding(x.ndim)
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

    def constrain_layer(self, state: nnx.State) -> nnx.State:
        """A layer's parameters (``state``, one layer of the scan) constrained to their ``param_rules`` shardings."""
        if self.mesh is None or self.param_rules is None:
            return state
        def constrain(path: tuple, variable):
            spec = partition_spec(("encoder", "layer", 0, *path), variable.shape, self.mesh, self.param_rules)
            value = jax.lax.with_sharding_constraint(variable.get_value(), NamedSharding(self.mesh, spec))
            return path, variable.replace(value)

        return nnx.from_flat_state([constrain(p, v) for p, v in nnx.to_flat_state(state)])

    def remat_policy(self):
        return {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}.get(self.remat)


def shard_batch_and_heads(fn, mesh: Mesh, batch_axes: Sequence[str] | None, head_axis: str | None,
                          with_mask: bool):
    """``fn(q, k, v[, mask])`` on ``[batch, seq, heads, dim]`` inputs run per shard under ``jax.shard_map``."""
    qkv = PartitionSpec(tuple(batch_axes) or None if batch_axes else None, None, head_axis, None)
    specs = (qkv,) * 3 + ((PartitionSpec(qkv[0], None),) if with_mask else ())
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)
