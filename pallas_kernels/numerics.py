"""The matmul precision rule shared by the kernels, the reference and the library built on them."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

__all__ = ["matmul_precision"]


def matmul_precision(dtype) -> lax.Precision:
    """Full float32 products for float32 inputs (as HF; GPUs would use TF32 and TPUs bfloat16 by default, which
    can change the block selection); the backend default for lower precisions."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT
