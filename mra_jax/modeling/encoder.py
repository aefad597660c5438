"""The post-LN encoder: `MraSelfAttention`, `MraLayer`, `MraEncoder` (HF's module and parameter names)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mra_jax.activations import ACT2FN
from mra_jax.attention import mra_attention
from mra_jax.configuration import MraConfig
from mra_jax.modeling.common import Dropout, Dtype, layer_norm, linear
from mra_jax.options import RuntimeOptions, shard_batch_and_heads


class MraSelfAttention(nnx.Module):
    """Query/key/value projections and MRA-2 attention (no attention-probability dropout, as in HF).

    With ``options.mesh`` the attention runs under ``jax.shard_map``, batch and heads split over the mesh (a
    ``pallas_call`` has no partitioning rule of its own).
    """

    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype,
                 options: RuntimeOptions):
        h = config.hidden_size
        self.query = linear(config, h, h, rngs, dtype, param_dtype)
        self.key = linear(config, h, h, rngs, dtype, param_dtype)
        self.value = linear(config, h, h, rngs, dtype, param_dtype)
        self.num_heads = config.num_attention_heads
        self.num_blocks = config.num_blocks
        self.approx_mode = config.approx_mode
        self.first_n_blocks = config.initial_prior_first_n_blocks
        self.diagonal_n_blocks = config.initial_prior_diagonal_n_blocks
        self.options = options

    def _attention(self, query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array) -> jax.Array:
        if self.options.implementation == "dense":
            keep = mask.astype(bool)[:, None, None, :]
            out = jax.nn.dot_product_attention(query, key, value, mask=keep)
            return out * mask[:, :, None, None].astype(out.dtype)
        return mra_attention(query, key, value, mask, num_blocks=self.num_blocks, approx_mode=self.approx_mode,
                             initial_prior_first_n_blocks=self.first_n_blocks,
                             initial_prior_diagonal_n_blocks=self.diagonal_n_blocks,
                             implementation=self.options.implementation, platform=self.options.platform)

    def __call__(self, hidden_states: jax.Array, attention_mask: jax.Array) -> jax.Array:
        batch, seq, hidden = hidden_states.shape
        heads = [proj(hidden_states).reshape(batch, seq, self.num_heads, hidden // self.num_heads)
                 for proj in (self.query, self.key, self.value)]
        attention = self._attention
        options = self.options
        if options.mesh is not None:
            attention = shard_batch_and_heads(attention, options.mesh, options.mesh_batch_axes,
                                              options.mesh_head_axis, with_mask=True)
        return attention(*heads, attention_mask).reshape(batch, seq, hidden)


class MraSelfOutput(nnx.Module):
    """Dense, dropout, residual, LayerNorm."""

    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype,
                 in_features: int | None = None):
        in_features = config.hidden_size if in_features is None else in_features
        self.dense = linear(config, in_features, config.hidden_size, rngs, dtype, param_dtype)
        self.LayerNorm = layer_norm(config, rngs, param_dtype)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def __call__(self, hidden_states: jax.Array, residual: jax.Array, deterministic: bool,
                 rngs: nnx.Rngs | None) -> jax.Array:
        hidden_states = self.dropout(self.dense(hidden_states), deterministic, rngs)
        return self.LayerNorm(hidden_states + residual)


class MraAttention(nnx.Module):
    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype,
                 options: RuntimeOptions):
        # `self.self` mirrors HF's parameter path `attention.self.query...`.
        self.self = MraSelfAttention(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, options=options)
        self.output = MraSelfOutput(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, hidden_states: jax.Array, attention_mask: jax.Array, deterministic: bool,
                 rngs: nnx.Rngs | None) -> jax.Array:
        return self.output(self.self(hidden_states, attention_mask), hidden_states, deterministic, rngs)


class MraIntermediate(nnx.Module):
    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        self.dense = linear(config, config.hidden_size, config.intermediate_size, rngs, dtype, param_dtype)
        self.activation = ACT2FN[config.hidden_act]

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return self.activation(self.dense(hidden_states))


class MraOutput(MraSelfOutput):
    """The feed-forward output: as `MraSelfOutput`, from the intermediate size."""

    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        super().__init__(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                         in_features=config.intermediate_size)


class MraLayer(nnx.Module):
    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype,
                 options: RuntimeOptions):
        self.attention = MraAttention(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, options=options)
        self.intermediate = MraIntermediate(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.output = MraOutput(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, hidden_states: jax.Array, attention_mask: jax.Array, deterministic: bool,
                 rngs: nnx.Rngs | None) -> jax.Array:
        attention_output = self.attention(hidden_states, attention_mask, deterministic, rngs)
        return self.output(self.intermediate(attention_output), attention_output, deterministic, rngs)


class MraEncoder(nnx.Module):
    """The layers; each is rematerialised in the backward pass as ``options.remat`` says.

    With ``options.scan_layers`` they run under one ``jax.lax.scan`` over their parameters: compile time independent
    of depth. The parameters stay per layer at ``encoder/layer/<i>`` (stacked inside the call) unless `stack_layers`
    made ``layer`` one `MraLayer` of stacked arrays (the training layout, `mra_jax.stacked_layers`). All paths
    compute the same: layer ``i`` draws its dropout from ``fold_in(key, i)``, ``key`` drawn once from ``rngs``.
    """

    def __init__(self, config: MraConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, options: RuntimeOptions | None = None):
        options = RuntimeOptions() if options is None else options
        self.layer = nnx.List([MraLayer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, options=options)
                               for _ in range(config.num_hidden_layers)])
        self.options = options

    def __call__(self, hidden_states: jax.Array, attention_mask: jax.Array, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None, output_hidden_states: bool = False,
                 ) -> tuple[jax.Array, tuple[jax.Array, ...] | None]:
        """Returns the last hidden state and, if ``output_hidden_states``, all hidden states (embeddings output
        first)."""
        options = self.options
        key = None if deterministic or rngs is None else rngs.dropout()

        def run(layer: MraLayer, hidden: jax.Array, index: jax.Array | int) -> jax.Array:
            layer_rngs = None if key is None else nnx.Rngs(dropout=jax.random.fold_in(key, index))
            return options.constrain_batch(layer(hidden, attention_mask, deterministic, layer_rngs))

        if options.remat != "none":
            run = nnx.remat(run, policy=options.remat_policy())
        if not options.scan_layers and not isinstance(self.layer, MraLayer):
            all_hidden = [hidden_states]
            for index, layer in enumerate(self.layer):
                hidden_states = run(layer, hidden_states, index)
                all_hidden.append(hidden_states)
            return hidden_states, tuple(all_hidden) if output_hidden_states else None

        if isinstance(self.layer, MraLayer):
            graphdef, stacked = nnx.split(self.layer)
        else:
            graphdef, stacked = nnx.graphdef(self.layer[0]), _stacked_state(self.layer)
        depth = jax.tree.leaves(stacked)[0].shape[0]

        def body(hidden: jax.Array, xs: tuple[jax.Array, nnx.State]) -> tuple[jax.Array, jax.Array | None]:
            index, state = xs
            hidden = run(nnx.merge(graphdef, options.constrain_layer(state)), hidden, index)
            return hidden, hidden if output_hidden_states else None

        last, ys = jax.lax.scan(body, hidden_states, (jnp.arange(depth), stacked))
        if not output_hidden_states:
            return last, None
        return last, (hidden_states, *(ys[i] for i in range(depth)))

    def stack_layers(self) -> None:
        """Hold the layers as one `MraLayer` whose arrays have a leading axis of the layers (in place)."""
        if not isinstance(self.layer, MraLayer):
            self.layer = nnx.merge(nnx.graphdef(self.layer[0]), _stacked_state(self.layer))


def _stacked_state(layers: nnx.List) -> nnx.State:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(layer) for layer in layers))


def stack_layers(model: nnx.Module) -> nnx.Module:
    """``model`` with the layers of each encoder that scans them (``options.scan_layers``) stacked, in place: the
    layout of a training state (`mra_jax.stacked_layers`)."""
    for _, module in list(nnx.iter_modules(model)):
        if isinstance(module, MraEncoder) and module.options.scan_layers:
            module.stack_layers()
    return model
