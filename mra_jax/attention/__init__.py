"""MRA-2 attention: low resolution, block selection, high resolution, combination."""

from mra_jax.attention.mra import mra_attention
from mra_jax.attention.sharded import sharded_mra_attention

__all__ = ["mra_attention", "sharded_mra_attention"]
