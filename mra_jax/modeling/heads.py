"""Task heads with HF's module and parameter names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mra_jax.activations import ACT2FN
from mra_jax.configuration import MraConfig
from mra_jax.modeling.common import Dropout, Dtype, layer_norm, linear
from pallas_kernels import matmul_precision


class MraPredictionHeadTransform(nnx.Module):
    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        self.dense = linear(config, config.hidden_size, config.hidden_size, rngs, dtype, param_dtype)
        self.activation = ACT2FN[config.hidden_act]
        self.LayerNorm = layer_norm(config, rngs, param_dtype)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return self.LayerNorm(self.activation(self.dense(hidden_states)))


class MraLMPredictionHead(nnx.Module):
    """Transform, then the decoder tied to the word embeddings, plus its own bias ``cls.predictions.bias``."""

    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        self.transform = MraPredictionHeadTransform(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype
        self.bias = nnx.Param(jnp.zeros((config.vocab_size,), param_dtype))

    def __call__(self, hidden_states: jax.Array, word_embeddings: nnx.Embed) -> jax.Array:
        hidden_states = self.transform(hidden_states).astype(self.dtype)
        table = word_embeddings.embedding[...].astype(self.dtype)
        logits = jnp.einsum("...h,vh->...v", hidden_states, table, precision=matmul_precision(self.dtype))
        return logits + self.bias[...].astype(logits.dtype)


class MraOnlyMLMHead(nnx.Module):
    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        self.predictions = MraLMPredictionHead(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, hidden_states: jax.Array, word_embeddings: nnx.Embed) -> jax.Array:
        return self.predictions(hidden_states, word_embeddings)


class MraClassificationHead(nnx.Module):
    """First token, dropout, dense, the config's activation (gelu, not tanh), dropout, projection."""

    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        self.dense = linear(config, config.hidden_size, config.hidden_size, rngs, dtype, param_dtype)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.out_proj = linear(config, config.hidden_size, config.num_labels, rngs, dtype, param_dtype)
        self.activation = ACT2FN[config.hidden_act]

    def __call__(self, features: jax.Array, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
        x = self.dropout(features[:, 0, :], deterministic, rngs)
        x = self.dropout(self.activation(self.dense(x)), deterministic, rngs)
        return self.out_proj(x)
