"""mra-jax: the MRA long-context encoder in JAX/Flax, numerically faithful to HuggingFace's ``MraModel``."""

from mra_jax.attention import mra_attention
from mra_jax.configuration import MraConfig

__all__ = ["MraConfig", "mra_attention"]
