"""NNX parameters <-> HF ``state_dict`` (name -> numpy array), with a strict check of names and shapes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mra_jax.conversion.hf_names import from_hf_tensor, hf_name, is_ignored, to_hf_tensor

_DECODER_BIAS = "cls.predictions.decoder.bias"
_LM_BIAS = "cls.predictions.bias"


def _param_paths(model: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
    return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def to_hf_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every parameter of ``model`` under its HF name, in HF's layout (tied decoder keys not included)."""
    return {hf_name(path): to_hf_tensor(path, np.asarray(var.get_value())) for path, var in _param_paths(model)}


def load_hf_state_dict(model: nnx.Module, tensors: dict[str, np.ndarray], *, source: str = "checkpoint") -> None:
    """Set every parameter of ``model`` (concrete or abstract) from HF-named ``tensors``, in place.

    Raises `ValueError` listing every missing, unexpected and mis-shaped tensor. Buffers
    (``embeddings.position_ids``) and the tied MLM decoder keys are accepted and ignored; an old checkpoint that
    holds only ``cls.predictions.decoder.bias`` supplies ``cls.predictions.bias`` from it.
    """
    tensors = dict(tensors)
    if _LM_BIAS not in tensors and _DECODER_BIAS in tensors:
        tensors[_LM_BIAS] = tensors[_DECODER_BIAS]
    params = _param_paths(model)
    expected = {hf_name(path) for path, _ in params}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(k for k in set(tensors) - expected if not is_ignored(k))
    mismatched = []
    values = {}
    for path, var in params:
        name = hf_name(path)
        if name not in tensors:
            continue
        value = from_hf_tensor(path, np.asarray(tensors[name]))
        target = var.get_value()
        if value.shape != tuple(target.shape):
            mismatched.append(f"{name}: checkpoint {tuple(tensors[name].shape)}, model expects "
                              f"{tuple(to_hf_tensor(path, np.empty(target.shape, np.int8)).shape)}")
            continue
        values[path] = jnp.asarray(value, dtype=target.dtype)
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"tensors with the wrong shape: {'; '.join(mismatched)}")
    if problems:
        raise ValueError(f"{source} does not match {type(model).__name__}: " + " | ".join(problems))
    for path, var in params:
        var.set_value(values[path])

