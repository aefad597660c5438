"""Process and mesh set-up shared by the training scripts: multi-host start, mesh checks, global batches."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mra_jax.configuration import MraConfig
from mra_jax.sharding import RULES, make_mesh
from mra_jax.training.config import DistributedConfig, MeshConfig


def initialize_distributed(cfg: DistributedConfig) -> None:
    """``jax.distributed.initialize`` when the config asks for it (before any other JAX call). Unset fields are
    left to JAX's own detection from the environment (TPU pods, SLURM, Open MPI)."""
    if cfg.local_device_count is not None:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={cfg.local_device_count}")
        jax.config.update("jax_num_cpu_devices", cfg.local_device_count)
    if cfg.enabled or cfg.coordinator_address is not None:
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id)


def build_mesh(cfg: MeshConfig) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh over all devices of all processes; a clear error if it does not fit."""
    if cfg.rules not in RULES:
        raise ValueError(f"mesh.rules must be one of {sorted(RULES)}, got {cfg.rules!r}")
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    bad = {k: v for k, v in sizes.items() if v == 0 or v < -1}
    if bad:
        raise ValueError(f"mesh sizes must be positive or -1, got {bad}")
    try:
        return make_mesh(cfg.data, cfg.fsdp, cfg.tensor)
    except ValueError as e:
        hint = ""
        if jax.default_backend() == "cpu":
            wanted = max(int(np.prod([v for v in sizes.values() if v > 0])), 2)
            hint = (f"; on CPUs, XLA_FLAGS=--xla_force_host_platform_device_count={wanted} (set before Python "
                    f"starts) makes {wanted} devices")
        raise ValueError(f"{e}{hint}") from None


def check_fits(config: MraConfig, mesh: Mesh, batch_size: int, grad_accum_steps: int, seq_len: int,
               length: str | None = None) -> None:
    """Refuse shapes the mesh cannot split and sequences longer than the model's positions, before anything is
    compiled. ``length`` says where ``seq_len`` comes from (default ``data.seq_len=<seq_len>``)."""
    errors = []
    if config.num_attention_heads % mesh.shape["tensor"]:
        errors.append(f"{config.num_attention_heads} attention heads are not divisible by mesh.tensor="
                      f"{mesh.shape['tensor']}")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % grad_accum_steps:
        errors.append(f"data.batch_size={batch_size} is not divisible by optimizer.grad_accum_steps="
                      f"{grad_accum_steps}")
    elif (batch_size // grad_accum_steps) % shards:
        errors.append(f"the micro-batch of {batch_size // grad_accum_steps} sequences (data.batch_size / "
                      f"optimizer.grad_accum_steps) is not divisible by mesh.data x mesh.fsdp = {shards}")
    if seq_len > config.max_position_embeddings:
        errors.append(f"{length or f'data.seq_len={seq_len}'} exceeds the model's max_position_embeddings "
                      f"({config.max_position_embeddings})")
    if batch_size % jax.process_count():
        errors.append(f"data.batch_size={batch_size} is not divisible by the {jax.process_count()} processes")
    if errors:
        raise ValueError("; ".join(errors))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows -> global arrays (rows of process ``p`` follow those of ``p - 1``)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def is_primary() -> bool:
    return jax.process_index() == 0

