"""`MraEmbeddings`: word + token type + absolute position embeddings, LayerNorm, dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mra_jax.configuration import POSITION_OFFSET, MraConfig
from mra_jax.modeling.common import Dropout, Dtype, layer_norm


def _lookup(table: nnx.Embed, ids: jax.Array) -> jax.Array:
    """``table(ids)``, NaN for ids outside ``[0, num_embeddings)`` (under ``jax.jit`` they cannot be refused, and
    a negative id would otherwise wrap around to a valid-looking row)."""
    valid = (ids >= 0) & (ids < table.num_embeddings)
    out = table(jnp.where(valid, ids, 0))
    return jnp.where(valid[..., None], out, jnp.asarray(jnp.nan, out.dtype))


class MraEmbeddings(nnx.Module):
    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        init = nnx.initializers.normal(config.initializer_range)
        pad = config.pad_token_id

        def word_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = param_dtype) -> jax.Array:
            table = init(key, shape, dtype)
            return table if pad is None else table.at[pad].set(0)

        self.pad_token_id = pad
        self.word_embeddings = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                         param_dtype=param_dtype, embedding_init=word_init, rngs=rngs)
        self.position_embeddings = nnx.Embed(config.max_position_embeddings + POSITION_OFFSET, config.hidden_size,
                                             dtype=dtype, param_dtype=param_dtype, embedding_init=init, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(config.type_vocab_size, config.hidden_size, dtype=dtype,
                                               param_dtype=param_dtype, embedding_init=init, rngs=rngs)
        self.LayerNorm = layer_norm(config, rngs, param_dtype)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def __call__(self, input_ids: jax.Array | None, token_type_ids: jax.Array, position_ids: jax.Array,
                 inputs_embeds: jax.Array | None = None, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        if inputs_embeds is None:
            inputs_embeds = _lookup(self.word_embeddings, input_ids)
            if self.pad_token_id is not None:
                # As torch's padding_idx: lookups of the pad token pass no gradient to its row.
                is_pad = (input_ids == self.pad_token_id)[..., None]
                inputs_embeds = jnp.where(is_pad, jax.lax.stop_gradient(inputs_embeds), inputs_embeds)
        embeddings = (inputs_embeds + _lookup(self.token_type_embeddings, token_type_ids)
                      + _lookup(self.position_embeddings, position_ids))
        embeddings = self.LayerNorm(embeddings)
        return self.dropout(embeddings, deterministic, rngs)
