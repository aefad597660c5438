"""Write parameters as an HF checkpoint directory (``config.json`` + ``model.safetensors``)."""

from __future__ import annotations

import os

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from mra_jax.configuration import POSITION_OFFSET, MraConfig
from mra_jax.conversion.hf_files import SAFETENSORS_FILE
from mra_jax.conversion.hf_names import BASE_PREFIX, hf_name, to_hf_tensor


def to_hf_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every parameter of ``model`` under its HF name in HF layout, float32, plus HF's ``position_ids`` buffer
    (the tied MLM decoder keys are left out, as transformers 5 does)."""
    tensors = {hf_name(path): np.ascontiguousarray(to_hf_tensor(path, np.asarray(var.get_value(), np.float32)))
               for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    prefix = BASE_PREFIX if any(n.startswith(BASE_PREFIX) for n in tensors) else ""
    positions = np.arange(model.config.max_position_embeddings, dtype=np.int64)[None] + POSITION_OFFSET
    tensors[f"{prefix}embeddings.position_ids"] = positions
    return tensors


def write_hf_checkpoint(model: nnx.Module, directory: str | os.PathLike) -> None:
    """``config.json`` (``architectures`` set to the model's class) and ``model.safetensors`` into ``directory``."""
    config: MraConfig = model.config
    config = config.with_extra(architectures=[type(model).__name__], dtype="float32")
    config.save_pretrained(directory)
    weights = os.path.join(directory, SAFETENSORS_FILE)
    save_file(to_hf_state_dict(model), weights, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(weights, 0o666 & ~umask)  # safetensors writes 0600; config.json and the rest get the usual mode
