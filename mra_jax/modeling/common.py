"""Building blocks shared by the MRA modules: HF's initialisation, activations, dropout."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mra_jax.configuration import MraConfig
from pallas_kernels import matmul_precision

Dtype = Any


def as_rngs(rngs: nnx.Rngs | jax.Array | int | None) -> nnx.Rngs | None:
    """Accept an ``nnx.Rngs``, a key or a seed for dropout."""
    if rngs is None or isinstance(rngs, nnx.Rngs):
        return rngs
    return nnx.Rngs(dropout=rngs)


def linear(config: MraConfig, in_features: int, out_features: int, rngs: nnx.Rngs, dtype: Dtype,
           param_dtype: Dtype) -> nnx.Linear:
    """HF's ``nn.Linear`` with its initialisation: weights N(0, initializer_range), biases 0; full float32 products
    when computing in float32."""
    return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                      precision=matmul_precision(dtype), kernel_init=nnx.initializers.normal(config.initializer_range),
                      rngs=rngs)


def layer_norm(config: MraConfig, rngs: nnx.Rngs, param_dtype: Dtype) -> nnx.LayerNorm:
    """HF's ``nn.LayerNorm`` (two-pass variance), always computed in float32."""
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, dtype=jnp.float32,
                         param_dtype=param_dtype, use_fast_variance=False, rngs=rngs)


class Dropout(nnx.Module):
    """Dropout that is off unless ``deterministic=False`` and ``rngs`` (with a ``dropout`` stream) are given."""

    def __init__(self, rate: float):
        self.rate = rate

    def __call__(self, x: jax.Array, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        if rngs is None:
            raise ValueError("dropout needs rngs (e.g. nnx.Rngs(dropout=0)) when deterministic=False")
        keep = jax.random.bernoulli(rngs.dropout(), 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)
