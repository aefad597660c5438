"""Training state, its shardings, and the jitted train and eval steps (functional: split model, merge inside).

A loss function ``loss_fn(model, batch, key, deterministic) -> (loss_sum, sums)`` returns the summed loss of a
(micro-)batch and a dict of sums that holds at least ``weight`` (what the loss is averaged over); ``key`` drives
dropout. An optional ``prepare(batch, key) -> batch`` (e.g. MLM masking) runs on the whole global batch first.
Micro-batches (gradient accumulation) add their sums, so without dropout an accumulated step equals the one big
batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mra_jax import stacked_layers
from mra_jax.modeling.encoder import stack_layers
from mra_jax.sharding import partition_spec
from mra_jax.stacked_layers import key_path

LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array, bool], tuple[jax.Array, dict[str, jax.Array]]]
PrepareFn = Callable[[Mapping[str, jax.Array], jax.Array], Mapping[str, jax.Array]]


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def param_state_shardings(params, mesh: Mesh, rules: str | Mapping[str, str | None]):
    """A `NamedSharding` for every leaf of ``params`` (arrays or shapes, same tree structure), by the rule set."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, partition_spec(key_path(path), x.shape, mesh, rules)), params)


def state_shardings(abstract: TrainState, params_shardings: nnx.State, tx: optax.GradientTransformation,
                    mesh: Mesh) -> TrainState:
    """Shardings of a whole `TrainState`: optimizer moments follow their parameters, the rest is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, params_shardings,
                                transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params_shardings, opt_state=opt)


def _plain(state: nnx.State) -> nnx.State:
    """Variables -> their raw values (a pytree of arrays, as optimizers and checkpoints want)."""
    return jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_state(build: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh,
                   rules: str | Mapping[str, str | None]) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """The model's graph, the shapes of its `TrainState` and their shardings on ``mesh``; nothing is allocated."""
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: stack_layers(build())), nnx.Param)
    abstract_params = _plain(abstract_params)
    abstract = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), abstract_params)
    shardings = state_shardings(abstract, param_state_shardings(abstract_params, mesh, rules), tx, mesh)
    return graphdef, abstract, shardings


def init_state(build: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh,
               rules: str | Mapping[str, str | None], params: nnx.State | None = None,
               ) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """The model's graph, a `TrainState` created directly sharded on ``mesh`` (never whole on one device), and
    its shardings. ``params``: start from these (per layer, already placed) instead of ``build``'s initialisation.
    A model that scans its layers gets a state in the stacked layout (`mra_jax.stacked_layers`)."""
    graphdef, abstract, shardings = abstract_state(build, tx, mesh, rules)
    depth = stacked_layers.num_stacked_layers(abstract.params)

    def create(p: nnx.State | None) -> TrainState:
        if p is None:
            p = _plain(nnx.split(stack_layers(build()), nnx.Param)[1])
        elif depth is not None:
            p = stacked_layers.stack(p)
        return TrainState(jnp.zeros((), jnp.int32), p, tx.init(p))

    options = _INIT_COMPILER_OPTIONS.get(mesh.devices.flat[0].platform)
    if params is None:
        state = jax.jit(lambda: create(None), out_shardings=shardings).lower().compile(options)()
    else:
        args = (_plain(params),)
        given = shardings.params if depth is None else stacked_layers.unstack(shardings.params, depth)
        state = jax.jit(create, in_shardings=(given,), out_shardings=shardings).lower(*args).compile(options)(*args)
    return graphdef, state, shardings


_INIT_COMPILER_OPTIONS = {
    # XLA:GPU's sibling multi-output fusion merges the random initialisers of all same-shaped parameters (their
    # threefry counters share one iota) into a few kernels of up to ~50 outputs; ptxas then spends minutes on them
    # (base size, deviceless H100 compile on 2 CPU cores: 190 s, 31 s without the pass). The pass only saves launches
    # of a program that runs once.
    "gpu": {"xla_disable_hlo_passes": "multi_output_fusion"},
}
"""Compiler options of the jitted initialisation, per platform."""


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    loss_fn: LossFn, *, seed: int, grad_accum_steps: int, shardings: TrainState,
                    batch_sharding: NamedSharding, prepare: PrepareFn | None = None) -> Callable:
    """``step(state, batch) -> (state, metrics)``, jitted with shardings and the state donated.

    The step's randomness (masking, dropout) is ``fold_in(key(seed), state.step)``: a resumed run draws exactly
    what the uninterrupted run drew. Metrics: ``loss`` (mean over the batch's weight), ``grad_norm`` (before
    clipping), ``learning_rate`` (the one this update used), the loss function's sums, and ``finite``.
    """
    base_key = jax.random.key(seed)

    def grads_of(params: nnx.State, batch: Mapping[str, jax.Array], key: jax.Array):
        def f(p):
            loss_sum, sums = loss_fn(nnx.merge(graphdef, p), batch, key, False)
            return loss_sum, {**sums, "loss_sum": loss_sum}
        return jax.grad(f, has_aux=True)(params)

    def step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        prepare_key, key = jax.random.split(jax.random.fold_in(base_key, state.step))
        if prepare is not None:
            batch = prepare(batch, prepare_key)
        if grad_accum_steps == 1:
            grads, sums = grads_of(state.params, batch, key)
        else:
            # Micro-batch a holds rows a, a + k, a + 2k, ...: every micro-batch stays spread over all devices.
            micro = jax.tree.map(lambda x: x.reshape(-1, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, xs):
                index, mb = xs
                g, s = grads_of(state.params, mb, jax.random.fold_in(key, index))
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zero = jax.eval_shape(grads_of, state.params, jax.tree.map(lambda x: x[0], micro), key)
            zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zero)
            (grads, sums), _ = jax.lax.scan(body, zero, (jnp.arange(grad_accum_steps), micro))
        weight = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss = sums["loss_sum"] / weight
        metrics = {**sums, "loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
                   "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return jax.jit(step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                   donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn, *, seed: int, shardings: TrainState,
                   batch_sharding: NamedSharding, prepare: PrepareFn | None = None) -> Callable:
    """``eval_step(params, batch, index) -> sums`` without dropout; batch ``index`` fixes its randomness."""
    base_key = jax.random.fold_in(jax.random.key(seed), 2**31 - 1)

    def step(params: nnx.State, batch: Mapping[str, jax.Array], index: jax.Array) -> dict[str, jax.Array]:
        key = jax.random.fold_in(base_key, index)
        if prepare is not None:
            batch = prepare(batch, key)
        loss_sum, sums = loss_fn(nnx.merge(graphdef, params), batch, key, True)
        return {**sums, "loss_sum": loss_sum}

    return jax.jit(step, in_shardings=(shardings.params, batch_sharding, None))
