"""`RuntimeOptions(scan_layers=True)`: the layers under one `jax.lax.scan` compute exactly what the Python loop does
(outputs, hidden states, loss, every gradient; with dropout and remat, also in a sharded train step), keep the
per-layer parameter layout, and appear once in the lowered program whatever the depth."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import mra_jax
from mra_jax import stacked_layers
from mra_jax.options import RuntimeOptions
from mra_jax.training import optim
from mra_jax.training import step as step_lib
from mra_jax.training.masking import MaskingSpec
from mra_jax.training.pretrain import mlm_loss, mlm_masking

CONFIG = mra_jax.MraConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                           intermediate_size=48, max_position_embeddings=128, block_per_row=1,
                           id2label={0: "a", 1: "b", 2: "c"})
B, S = 2, 64


def _inputs(cls) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    mask = (np.arange(S)[None] < np.asarray([S, 40])[:, None]).astype(np.int32)
    ids = np.where(mask, rng.integers(3, CONFIG.vocab_size, (B, S)), CONFIG.pad_token_id)
    labels = (np.where(rng.random((B, S)) < 0.3, ids, -100) if cls is mra_jax.MraForMaskedLM
              else rng.integers(0, 3, B))
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels)}


def _run(cls, options: RuntimeOptions, dropout: bool):
    """Loss, outputs (hidden states included), parameter gradients and the loss without dropout of a fresh model,
    jitted."""
    graphdef, params = nnx.split(cls(CONFIG, rngs=nnx.Rngs(0), options=options), nnx.Param)
    inputs = _inputs(cls)

    def loss(p):
        model = nnx.merge(graphdef, p)
        out = model(**inputs, output_hidden_states=True, deterministic=not dropout,
                    rngs=jax.random.key(7) if dropout else None)
        return out.loss, (out, model(**inputs).loss)

    (value, (out, deterministic)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return jax.device_get((value, out, grads, deterministic))


def _assert_same(got, want, rtol: float = 1e-6) -> None:
    """Same trees; each leaf within ``rtol`` of its largest value (or of the tree's, for leaves that are ~0: the
    key biases' gradients, which the softmax cancels)."""
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(want))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        assert a.shape == b.shape, path
        assert np.abs(a - b).max() <= rtol * max(np.abs(b).max(), 1e-3 * scale), jax.tree_util.keystr(path)


@pytest.mark.slow
@pytest.mark.parametrize(("cls", "remat", "dropout"), [
    (mra_jax.MraForMaskedLM, "none", False),
    (mra_jax.MraForMaskedLM, "none", True),
    (mra_jax.MraForMaskedLM, "full", True),
    (mra_jax.MraForMaskedLM, "dots", False),
    (mra_jax.MraForSequenceClassification, "full", True),
])
def test_scanned_layers_equal_the_loop(cls, remat, dropout):
    loop = _run(cls, RuntimeOptions(remat=remat), dropout)
    scanned = _run(cls, RuntimeOptions(remat=remat, scan_layers=True), dropout)
    assert len(scanned[1].hidden_states) == CONFIG.num_hidden_layers + 1
    _assert_same(scanned, loop)
    assert (abs(float(loop[0]) - float(loop[3])) > 1e-4) == dropout  # dropout masks were drawn, or none


def test_remat_policy_acts_inside_the_scan():
    """What the forward scan keeps for the backward pass: the layer inputs only with "full", the matmul outputs
    too with "dots", everything without remat."""
    ids = _inputs(mra_jax.MraModel)["input_ids"]

    def residuals(remat: str) -> int:
        model = mra_jax.MraModel(CONFIG, rngs=nnx.Rngs(0), options=RuntimeOptions(remat=remat, scan_layers=True))
        graphdef, params = nnx.split(model, nnx.Param)
        jaxpr = jax.make_jaxpr(jax.grad(lambda p: nnx.merge(graphdef, p)(ids).last_hidden_state.sum()))(params)
        forward, _backward = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
        return sum(math.prod(v.aval.shape) for v in forward.outvars)

    full, dots, none = residuals("full"), residuals("dots"), residuals("none")
    assert full <= (CONFIG.num_hidden_layers + 1) * B * S * CONFIG.hidden_size < dots < none


def test_the_scanned_program_holds_the_layer_once():
    """The lowered forward's matmuls: as many at 8 layers as at 2 with the scan, 6 more per layer without."""
    def matmuls(layers: int, scan: bool) -> int:
        config = dataclasses.replace(CONFIG, num_hidden_layers=layers)
        graphdef, params = nnx.split(mra_jax.MraModel(config, rngs=nnx.Rngs(0),
                                                      options=RuntimeOptions(scan_layers=scan)), nnx.Param)
        ids = _inputs(mra_jax.MraModel)["input_ids"]
        text = jax.jit(lambda p: nnx.merge(graphdef, p)(ids).last_hidden_state).lower(params).as_text()
        return text.count("stablehlo.dot_general")

    assert matmuls(8, True) == matmuls(2, True)
    assert matmuls(8, False) - matmuls(2, False) == 6 * 6


def test_checkpoints_of_scanned_and_unscanned_models_are_interchangeable(tmp_path):
    """The parameter layout does not depend on the option: a checkpoint of either loads into the other."""
    ids = _inputs(mra_jax.MraForMaskedLM)["input_ids"]
    models = {scan: mra_jax.MraForMaskedLM(CONFIG, rngs=nnx.Rngs(scan), options=RuntimeOptions(scan_layers=scan))
              for scan in (False, True)}
    layouts = {scan: [(p, v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(m))]
               for scan, m in models.items()}
    assert layouts[True] == layouts[False]
    assert ("mra", "encoder", "layer", 2, "output", "dense", "kernel") in dict(layouts[True])
    for scan, model in models.items():
        model.save_pretrained(tmp_path / str(scan))
        loaded = mra_jax.MraForMaskedLM.from_pretrained(tmp_path / str(scan),
                                                        options=RuntimeOptions(scan_layers=not scan))
        assert [(p, v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(loaded))] == layouts[scan]
        np.testing.assert_allclose(np.asarray(loaded(ids).logits), np.asarray(model(ids).logits),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sharded_train_step_with_scan_equals_the_loop():
    """A whole jitted train step (masking, dropout, AdamW) on data 2 x fsdp 4 fake devices."""
    spec = MaskingSpec(mask_id=98, vocab_size=99, special_ids=(0, 1, 2, 98))
    config = dataclasses.replace(CONFIG, num_hidden_layers=2, hidden_size=64)
    mesh = mra_jax.sharding.make_mesh(2, 4, 1)
    schedule = optim.make_schedule(optim.OptimizerConfig(warmup_steps=0), 10)
    tx = optim.make_optimizer(optim.OptimizerConfig(), schedule)
    rng = np.random.default_rng(3)
    batch = {"input_ids": jnp.asarray(rng.integers(3, 98, (8, S)), jnp.int32),
             "attention_mask": jnp.ones((8, S), jnp.int32)}
    results = []
    for scan in (False, True):
        options = RuntimeOptions(mesh=mesh, scan_layers=scan, param_rules="fsdp")
        graphdef, state, shardings = step_lib.init_state(
            lambda options=options: mra_jax.MraForMaskedLM(config, rngs=nnx.Rngs(0), options=options), tx, mesh,
            "fsdp")
        train = step_lib.make_train_step(graphdef, tx, schedule, mlm_loss, seed=0, grad_accum_steps=1,
                                         shardings=shardings, prepare=mlm_masking(spec),
                                         batch_sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
        new_state, metrics = train(state, batch)
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), new_state))
    (loss, norm, state), (scan_loss, scan_norm, scan_state) = results
    assert scan_loss == pytest.approx(loss, rel=1e-6) and scan_norm == pytest.approx(norm, rel=1e-5)
    # The scanning model's state is stacked: one array per layer parameter, sharded as each layer's is.
    kernel = scan_state.params["mra"]["encoder"]["layer"]["intermediate"]["dense"]["kernel"]
    assert kernel.shape == (2, 64, 48) and kernel.sharding.spec == PartitionSpec(None, "fsdp", None)
    assert state.params["mra"]["encoder"]["layer"][1]["intermediate"]["dense"]["kernel"].sharding.spec == (
        PartitionSpec("fsdp", None))
    assert stacked_layers.num_stacked_layers(scan_state.opt_state) == 2
    _assert_same(jax.device_get(stacked_layers.unstack(scan_state.params, 2)), jax.device_get(state.params),
                 rtol=1e-5)
    _assert_same(jax.device_get(stacked_layers.unstack(scan_state.opt_state, 2)), jax.device_get(state.opt_state),
                 rtol=1e-5)
