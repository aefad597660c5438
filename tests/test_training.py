"""The training core in one process on 8 fake CPU devices: masked-position loss, masking, sharded steps equal to
the single-device step, partition specs, gradient accumulation, the optimizer, config and mesh refusals, NaN guard."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import mra_jax
from mra_jax.options import RuntimeOptions
from mra_jax.training import optim
from mra_jax.training import step as step_lib
from mra_jax.training.config import PretrainConfig, load_config
from mra_jax.training.masking import MaskingSpec, mask_tokens
from mra_jax.training.pretrain import NonFiniteError, mlm_loss, mlm_masking, run

CONFIG = mra_jax.MraConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=128, block_per_row=1)
SPEC = MaskingSpec(mask_id=98, vocab_size=99, special_ids=(0, 1, 2, 3, 98))
B, S = 8, 64


def _batch(seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, 98, (B, S))
    lengths = rng.integers(S // 2, S + 1, B)
    mask = (np.arange(S)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask, ids, 1)
    ids[:, 0] = 0
    return {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask)}


def test_masking_draws_bert_positions_and_never_specials_or_padding():
    batch = _batch()
    ids, positions, labels, weights = jax.jit(lambda k: mask_tokens(k, batch["input_ids"], batch["attention_mask"],
                                                                     SPEC))(jax.random.key(3))
    ids, positions, labels, weights = map(np.asarray, (ids, positions, labels, weights))
    original = np.asarray(batch["input_ids"])
    eligible = (np.asarray(batch["attention_mask"]) == 1) & ~np.isin(original, SPEC.special_ids)
    assert positions.shape == (B, SPEC.num_predictions(S))
    for row in range(B):
        chosen = positions[row][weights[row] == 1]
        assert len(set(chosen)) == len(chosen) == max(1, round(eligible[row].sum() * 0.15))
        assert eligible[row][chosen].all()
        np.testing.assert_array_equal(labels[row][weights[row] == 1], original[row][chosen])
        untouched = np.setdiff1d(np.arange(S), chosen)
        np.testing.assert_array_equal(ids[row][untouched], original[row][untouched])
    replaced = ids[np.arange(B)[:, None], positions][weights == 1]
    assert (replaced == SPEC.mask_id).mean() > 0.5
    again = mask_tokens(jax.random.key(3), batch["input_ids"], batch["attention_mask"], SPEC)
    np.testing.assert_array_equal(np.asarray(again[0]), ids)


def test_masking_replaces_80_10_10_with_random_ids_across_the_vocabulary():
    """Of ~9,800 predicted tokens: 80% become <mask>, 10% a random id (spread over the vocabulary), 10% stay."""
    spec = MaskingSpec(mask_id=999, vocab_size=1000, special_ids=(0, 1, 2, 999))
    ids = jax.random.randint(jax.random.key(0), (128, 512), 3, 999)
    masked, positions, labels, weights = map(np.asarray, jax.jit(lambda k: mask_tokens(
        k, ids, jnp.ones_like(ids), spec))(jax.random.key(1)))
    chosen = weights == 1
    new = masked[np.arange(128)[:, None], positions][chosen]
    original = labels[chosen]
    assert chosen.sum() > 9000
    to_mask, kept = (new == spec.mask_id).mean(), (new == original).mean()
    randomised = (new != spec.mask_id) & (new != original)
    assert abs(to_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(randomised.mean() - 0.1) < 0.015
    assert len(np.unique(new[randomised])) > 500  # uniform over 1,000 ids, not a fixed replacement


def test_masked_positions_loss_equals_full_logits_loss():
    model = mra_jax.MraForMaskedLM(CONFIG, rngs=nnx.Rngs(0))
    batch = mlm_masking(SPEC)(_batch(), jax.random.key(1))
    sums = nnx.jit(lambda m, b: m.masked_positions_loss(b["input_ids"], b["attention_mask"], b["positions"],
                                                        b["labels"], b["weights"]))(model, batch)
    labels = np.full((B, S), -100)
    pos, lab, w = map(np.asarray, (batch["positions"], batch["labels"], batch["weights"]))
    for row in range(B):
        labels[row, pos[row][w[row] == 1]] = lab[row][w[row] == 1]
    out = nnx.jit(lambda m, b, y: m(b["input_ids"], attention_mask=b["attention_mask"], labels=y))(
        model, batch, jnp.asarray(labels))
    assert float(sums["weight"]) == (labels != -100).sum()
    assert abs(float(sums["loss_sum"] / sums["weight"]) - float(out.loss)) < 1e-5 * float(out.loss)
    predictions = np.asarray(out.logits.argmax(-1))
    assert float(sums["correct"]) == ((predictions == labels) & (labels != -100)).sum()


def _state_and_step(mesh, rules, config=CONFIG, grad_accum_steps=1):
    options = RuntimeOptions(mesh=mesh)
    schedule = optim.make_schedule(optim.OptimizerConfig(warmup_steps=0), 10)
    tx = optim.make_optimizer(optim.OptimizerConfig(), schedule)
    graphdef, state, shardings = step_lib.init_state(
        lambda: mra_jax.MraForMaskedLM(config, rngs=nnx.Rngs(0), options=options), tx, mesh, rules)
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    train = step_lib.make_train_step(graphdef, tx, schedule, mlm_loss, seed=0, grad_accum_steps=grad_accum_steps,
                                     shardings=shardings, batch_sharding=batch_sharding, prepare=mlm_masking(SPEC))

    def grads(state, batch):  # the step's loss and gradients (same keys as the step), sharded as the state
        prepare_key, key = jax.random.split(jax.random.fold_in(jax.random.key(0), state.step))
        batch = mlm_masking(SPEC)(batch, prepare_key)
        (loss_sum, sums), g = jax.value_and_grad(
            lambda p: mlm_loss(nnx.merge(graphdef, p), batch, key, False), has_aux=True)(state.params)
        return loss_sum / sums["weight"], g

    grads = jax.jit(grads, in_shardings=(shardings, batch_sharding), out_shardings=(None, shardings.params))
    return state, shardings, train, grads


@pytest.fixture(scope="module")
def single_device():
    mesh = mra_jax.sharding.make_mesh(devices=jax.devices()[:1])
    state, _, train, grads = _state_and_step(mesh, "dp")
    batch = _batch()
    loss, g = grads(state, batch)
    _, metrics = train(state, batch)
    return float(loss), jax.device_get(g), float(metrics["loss"])


@pytest.mark.slow
@pytest.mark.parametrize(("sizes", "rules"), [((8, 1, 1), "dp"), ((2, 4, 1), "fsdp"), ((1, 4, 2), "fsdp_tp")])
def test_sharded_step_equals_single_device_step(sizes, rules, single_device):
    mesh = mra_jax.sharding.make_mesh(*sizes)
    state, _, train, grads = _state_and_step(mesh, rules)
    batch = _batch()
    loss, g = grads(state, batch)
    ref_loss, ref_grads, ref_step_loss = single_device
    assert abs(float(loss) - ref_loss) <= 1e-6 * ref_loss
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(ref_grads))
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(g)),
                                 jax.tree.leaves(ref_grads), strict=True):
        # Relative to the leaf, or to the largest gradient for leaves that are ~0 (key biases: softmax-invariant).
        assert np.abs(got - want).max() <= 1e-5 * max(np.abs(want).max(), 1e-3 * scale), path
    if rules == "fsdp_tp":  # the whole jitted step too (one compile is enough for the suite's time)
        new_state, metrics = train(state, batch)
        assert abs(float(metrics["loss"]) - ref_step_loss) <= 1e-6 * ref_step_loss
    else:
        new_state = state
    # Every parameter and optimizer-state leaf is placed as the rule set says (and stays so after a step).
    specs = {step_lib.key_path(p): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(new_state.params)}
    expected_embed = {"dp": None, "fsdp": "fsdp", "fsdp_tp": "fsdp"}[rules]
    query = specs[("mra", "encoder", "layer", 0, "attention", "self", "query", "kernel")]
    assert tuple(query) == (expected_embed, "tensor" if rules == "fsdp_tp" else None)
    assert tuple(specs[("mra", "embeddings", "word_embeddings", "embedding")]) == (None, expected_embed)
    assert tuple(specs[("mra", "encoder", "layer", 1, "intermediate", "dense", "kernel")]) == (
        expected_embed, "tensor" if rules == "fsdp_tp" else None)
    moments = [m for name in ("mu", "nu") for _, m in optax.tree_utils.tree_get_all_with_path(new_state.opt_state,
                                                                                              name)]
    assert len(moments) == 2
    for moment in moments:
        for path, x in jax.tree_util.tree_leaves_with_path(moment):
            assert x.sharding.spec == specs[step_lib.key_path(path)], path
    assert new_state.step.sharding.spec == PartitionSpec()

@pytest.mark.slow

def test_gradient_accumulation_equals_the_big_batch():
    config = dataclasses.replace(CONFIG, hidden_dropout_prob=0.0, num_hidden_layers=1)
    mesh = mra_jax.sharding.make_mesh(2, 2, 1, devices=jax.devices()[:4])
    batch = _batch(5)
    outs = []
    for accum in (1, 2):
        state, _, train, _ = _state_and_step(mesh, "fsdp", config, grad_accum_steps=accum)
        new_state, metrics = train(state, batch)
        outs.append((float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(new_state.params)))
    assert abs(outs[0][0] - outs[1][0]) <= 1e-6 * outs[0][0]
    assert abs(outs[0][1] - outs[1][1]) <= 1e-5 * outs[0][1]
    for a, b in zip(jax.tree.leaves(outs[0][2]), jax.tree.leaves(outs[1][2]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_optimizer_decays_only_weights_and_follows_the_schedule():
    cfg = optim.OptimizerConfig(learning_rate=1e-3, warmup_steps=10, end_learning_rate=1e-4, schedule="cosine")
    schedule = optim.make_schedule(cfg, 100)
    np.testing.assert_allclose([schedule(s) for s in (0, 5, 10, 55, 100)], [0, 5e-4, 1e-3, 5.5e-4, 1e-4], rtol=1e-5)
    linear = optim.make_schedule(dataclasses.replace(cfg, schedule="linear", end_learning_rate=0.0), 100)
    np.testing.assert_allclose([linear(s) for s in (10, 55, 100)], [1e-3, 5e-4, 0], atol=1e-9)
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "LayerNorm": {"scale": jnp.ones(2)},
              "word_embeddings": {"embedding": jnp.ones((3, 2))}}
    tx = optim.make_optimizer(dataclasses.replace(cfg, weight_decay=0.1, warmup_steps=0, schedule="constant"),
                              optax.constant_schedule(1.0))
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(jnp.abs(updates["dense"]["kernel"]).max()) > 0
    assert float(jnp.abs(updates["word_embeddings"]["embedding"]).max()) > 0
    assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0
    assert float(jnp.abs(updates["LayerNorm"]["scale"]).max()) == 0


def _tiny(tmp_path, *overrides):
    return load_config(PretrainConfig, "configs/pretrain/tiny.yaml",
                       [f"output_dir={tmp_path}", "progress_bar=false", "tensorboard=false", "data.seq_len=64",
                        "data.batch_size=8", *overrides])


@pytest.mark.parametrize(("overrides", "message"), [
    (["mesh.data=3"], "mesh"),
    (["mesh.data=2", "mesh.tensor=4"], "attention heads are not divisible by mesh.tensor=4"),
    (["data.batch_size=12"], "not divisible by mesh.data x mesh.fsdp = 8"),
    (["optimizer.grad_accum_steps=3"], "not divisible by optimizer.grad_accum_steps=3"),
    (["data.seq_len=1024"], "exceeds the model's max_position_embeddings"),
    (["dtype=float16"], "dtype must be one of"),
    (["model=configs/models/nope.json"], "does not exist"),
])
def test_bad_configs_are_refused_before_any_compilation(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        run(_tiny(tmp_path, *overrides))
    assert list(tmp_path.iterdir()) == []  # nothing at all was written


@pytest.mark.parametrize(("field", "value", "message"), [
    ("b1", 2.0, r"optimizer\.b1 must be in \[0, 1\), got 2\.0"),
    ("b2", 1.0, r"optimizer\.b2 must be in \[0, 1\), got 1\.0"),
    ("eps", -1.0, r"optimizer\.eps must be positive, got -1\.0"),
    ("eps", 0.0, r"optimizer\.eps must be positive"),
    ("weight_decay", -5.0, r"optimizer\.weight_decay must be non-negative and finite, got -5\.0"),
    ("end_learning_rate", 1.0, r"optimizer\.end_learning_rate must be in \[0, learning_rate=0\.0005\]"),
    ("learning_rate", float("inf"), r"optimizer\.learning_rate|end_learning_rate"),
])
def test_optimizer_settings_outside_their_domain_are_refused(field, value, message):
    cfg = dataclasses.replace(optim.OptimizerConfig(), **{field: value})
    with pytest.raises(ValueError, match=message):
        cfg.validate(1000)
    optim.OptimizerConfig().validate(1000)  # the defaults pass


def test_string_fields_keep_the_text_given():
    cfg = load_config(PretrainConfig, "configs/pretrain/tiny.yaml",
                      ["output_dir=0123", "data.tokenizer=on", "model=1e3", "attention=null", "steps=7",
                       "data.text_field='body'", "data.train_files=[a.txt,b.jsonl]"])
    assert (cfg.output_dir, cfg.data.tokenizer, cfg.model, cfg.attention, cfg.steps, cfg.data.text_field) == (
        "0123", "on", "1e3", None, 7, "body")
    assert cfg.data.train_files == ["a.txt", "b.jsonl"]
    one = load_config(PretrainConfig, "configs/pretrain/tiny.yaml", ["data.train_files=a.jsonl"])
    assert one.data.train_files == ["a.jsonl"]  # one file needs no brackets


@pytest.mark.parametrize("script", ["pretrain", "finetune", "demo"])
def test_yaml_and_override_syntax_errors_are_one_line_errors(script, tmp_path, capsys):
    """Each script reports a broken YAML file, a YAML list and a malformed override in one line (no traceback)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(script, f"scripts/{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "broken.yaml").write_text("steps: 10\ndata: {seq_len: [1\n")
    (tmp_path / "list.yaml").write_text("- steps\n- 10\n")
    cases = [([str(tmp_path / "broken.yaml")], r"^error: config file .*broken\.yaml is not valid YAML: did not find "
                                                r"expected ',' or '\]' \(line 3, column 1\)$"),
             ([str(tmp_path / "list.yaml")], r"^error: config file .*list\.yaml must hold a mapping of keys at its "
                                             r"top level, not a list$")]
    if script != "demo":
        key = "train_files" if script == "pretrain" else "labels"
        cases.append(([f"configs/{script}/{'tiny.yaml' if script == 'pretrain' else 'majority-tiny.yaml'}",
                       f"data.{key}=[a.jsonl"], rf"^error: override 'data\.{key}=\[a\.jsonl': its value is not "
                                                r"valid YAML: did not find expected ',' or '\]'$"))
    for argv, message in cases:
        assert module.main(argv) != 0
        err = capsys.readouterr().err
        assert re.match(message, err.strip()) and len(err.strip().splitlines()) == 1, err


def test_unknown_keys_and_wrong_types_are_refused():
    with pytest.raises(ValueError, match="Did you mean: 'steps'"):
        load_config(PretrainConfig, "configs/pretrain/tiny.yaml", ["stepz=3"])
    with pytest.raises(ValueError, match=r"full_key: data\.seq_len"):
        load_config(PretrainConfig, "configs/pretrain/tiny.yaml", ["data.seq_len=abc"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(PretrainConfig, "configs/pretrain/tiny.yaml", ["steps"])

@pytest.mark.slow

def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # The learning rate warms up from 0 to 1e30: step 1 changes nothing, step 2 blows the weights up, step 3's loss
    # is not finite.
    cfg = _tiny(tmp_path, "steps=6", "checkpoint_every=1", "log_every=3", "eval_every=0", "mesh.data=8",
                "optimizer.learning_rate=1e30", "optimizer.warmup_steps=3", "optimizer.max_grad_norm=0",
                "attention=dense")
    with pytest.raises(NonFiniteError, match=r"step (\d)") as info:
        run(cfg)
    bad = int(info.value.args[0].split()[1].rstrip(":"))
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) < bad
    assert not any("tmp" in p.name for p in (tmp_path / "checkpoints").iterdir())
    metrics = tmp_path / "metrics.jsonl"  # the window holding the bad step is not logged
    logged = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    assert all(np.isfinite(r["loss"]) and r["step"] < bad for r in logged if "loss" in r)
    restored = mra_jax.MraForMaskedLM.from_pretrained(tmp_path / "checkpoints" / str(max(steps)))
    assert all(np.isfinite(np.asarray(v.get_value())).all() for _, v in nnx.to_flat_state(nnx.state(restored)))

@pytest.mark.slow

def test_nan_guard_sees_an_update_that_makes_the_state_non_finite(tmp_path):
    # A learning rate past float32's range: step 1's loss and gradient norm are finite, its update is not.
    cfg = _tiny(tmp_path, "steps=3", "checkpoint_every=1", "log_every=1", "eval_every=1", "mesh.data=8",
                "optimizer.learning_rate=1e39", "optimizer.warmup_steps=0", "attention=dense")
    with pytest.raises(NonFiniteError, match=r"step 1: the parameters or optimizer state after the update are not "
                                             r"finite \(loss \d"):
        run(cfg)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    metrics = tmp_path / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()

@pytest.mark.slow

def test_remat_policies_give_the_same_gradients():
    batch = mlm_masking(SPEC)(_batch(2), jax.random.key(0))
    results = []
    for remat in ("none", "full", "dots"):
        model = mra_jax.MraForMaskedLM(dataclasses.replace(CONFIG, num_hidden_layers=1), rngs=nnx.Rngs(0),
                                       options=RuntimeOptions(remat=remat))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p, graphdef=graphdef):
            return mlm_loss(nnx.merge(graphdef, p), batch, jax.random.key(1), False)[0]

        results.append(jax.device_get(jax.jit(jax.value_and_grad(loss))(params)))
    for value, grads in results[1:]:
        assert float(value) == pytest.approx(float(results[0][0]), rel=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(results[0][1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="remat must be one of"):
        RuntimeOptions(remat="some")


def test_training_checkpoints_refuse_content_that_differs_from_their_checksums(tmp_path):
    """Two well-formed checkpoints; one's parameter files swapped for the other's decode fine but are refused by
    the checksums written at save time (per array and shard, on an 8-device mesh), also when restored on another
    mesh; so is the swap with its checksums, a whole step under another number, and a step without checksums
    (unless allowed); the intact one restores on either mesh."""
    import shutil

    import grain

    from mra_jax.training.checkpointing import TrainCheckpoints

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    tiny = mra_jax.MraConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                             intermediate_size=8, max_position_embeddings=64)
    ckpts = TrainCheckpoints(tmp_path / "ckpt")
    optimizer = optax.adam(1e-3)
    states = []
    for step in (1, 2):
        params = {"w": jax.device_put(jnp.full((16, 4), float(step)), rows), "b": jnp.arange(3.0) * step}
        opt_state = optimizer.update(params, optimizer.init(params), params)[1]  # moments that differ by step
        state = step_lib.TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state)
        data = iter(grain.MapDataset.range(10).to_iter_dataset())
        ckpts.save(state, data, tiny, {"seed": 0})
        states.append(state)
    ckpts.wait()
    assert (tmp_path / "ckpt" / "2" / "checksums").is_dir()
    shardings = jax.tree.map(lambda x: x.sharding, states[1])

    def restore(step):
        return ckpts.restore(step, states[1], shardings, iter(grain.MapDataset.range(10).to_iter_dataset()))

    restored, meta = restore(2)
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), 2.0)
    assert meta["step"] == 2
    # Restored on another mesh (4 devices, 4 rows each, where the save had 8 x 2): each recorded slice is checked
    # inside the shard that covers it.
    other = NamedSharding(jax.make_mesh((4,), ("data",), devices=jax.devices()[:4],
                                        axis_types=(jax.sharding.AxisType.Auto,)), PartitionSpec("data"))
    on_other = jax.tree.map(lambda s: other if s == rows else s, shardings)
    restored, _ = ckpts.restore(2, states[1], on_other, iter(grain.MapDataset.range(10).to_iter_dataset()))
    assert restored.params["w"].sharding == other
    shutil.copytree(tmp_path / "ckpt" / "1", tmp_path / "ckpt" / "3")  # a whole step (checksums too) renamed
    ckpts.close()
    ckpts = TrainCheckpoints(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"ckpt/3 says it holds step 1: its items were moved from another step"):
        restore(3)
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "ckpt" / "1", damaged / "1")
    largest = max((p for p in (damaged / "1" / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:  # a file cut short (a full disk, an interrupted copy)
        f.truncate(largest.stat().st_size // 3)
    with pytest.raises(ValueError, match=r"damaged/1 cannot be read \(.*\); resume from another step"):
        TrainCheckpoints(damaged).restore(1, states[1], shardings, iter(grain.MapDataset.range(10).to_iter_dataset()))
    shutil.rmtree(tmp_path / "ckpt" / "2" / "params")  # step 1's parameters in step 2: refused on either mesh
    shutil.copytree(tmp_path / "ckpt" / "1" / "params", tmp_path / "ckpt" / "2" / "params")
    for other_shardings in (shardings, on_other):
        with pytest.raises(ValueError, match=r"ckpt/2 is corrupted: the content of \['params'\]\['b'\], "
                                             r"\['params'\]\['w'\] differs from the checksums"):
            ckpts.restore(2, states[1], other_shardings, iter(grain.MapDataset.range(10).to_iter_dataset()))
    shutil.rmtree(tmp_path / "ckpt" / "2" / "checksums")  # ... with step 1's checksums too: the rest differs
    shutil.copytree(tmp_path / "ckpt" / "1" / "checksums", tmp_path / "ckpt" / "2" / "checksums")
    with pytest.raises(ValueError, match=r"ckpt/2 is corrupted: the content of \['opt_state'\]"):
        restore(2)
    shutil.rmtree(tmp_path / "ckpt" / "2" / "checksums")  # ... with no checksums at all: refused unless allowed
    with pytest.raises(ValueError, match=r"ckpt/2 has no checksums \(checksums/ is missing\), so its content "
                                         r"cannot be verified; pass --allow-unverified"):
        restore(2)
    ckpts.close()
    shutil.rmtree(tmp_path / "ckpt" / "1" / "checksums")
    unverified = TrainCheckpoints(tmp_path / "ckpt", allow_unverified=True)
    restored, _ = unverified.restore(1, states[1], shardings, iter(grain.MapDataset.range(10).to_iter_dataset()))
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), 1.0)
    unverified.close()


def test_checksums_are_hashed_in_the_background_before_the_step_commits(tmp_path, monkeypatch):
    """`save` returns while the hashing is held up, the arrays may then be deleted (as a donating step does), and
    the step is committed only once its checksums, those of the saved values, are written."""
    import threading

    import grain

    from mra_jax.training import checkpointing

    release, hashing = threading.Event(), []
    sha256 = checkpointing._sha256

    def held(value):
        hashing.append(threading.current_thread())
        release.wait(60)
        return sha256(value)

    tiny = mra_jax.MraConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                             intermediate_size=8, max_position_embeddings=64)
    params = {"w": jnp.arange(64.0).reshape(16, 4)}
    state = step_lib.TrainState(step=jnp.asarray(1, jnp.int32), params=params, opt_state=optax.sgd(1.0).init(params))
    expected = checkpointing.shard_checksums({"params": params, "opt_state": state.opt_state})
    monkeypatch.setattr(checkpointing, "_sha256", held)
    ckpts = checkpointing.TrainCheckpoints(tmp_path)
    ckpts.save(state, iter(grain.MapDataset.range(4).to_iter_dataset()), tiny, {"seed": 0})
    params["w"].delete()
    assert not (tmp_path / "1").exists()
    release.set()
    ckpts.wait()
    assert hashing and threading.main_thread() not in hashing
    assert json.loads((tmp_path / "1" / "checksums" / "metadata").read_text()) == expected
    ckpts.close()


def test_training_checkpoints_keep_the_best_by_metric_beside_the_latest(tmp_path):
    """keep=1 with a best metric: of four saves whose accuracy peaks at the second, the second (best) and the fourth
    (latest) stay on disk, and best_step names the second; with mode "min" the best is the lowest."""
    import grain

    from mra_jax.training.checkpointing import TrainCheckpoints

    tiny = mra_jax.MraConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                             intermediate_size=8, max_position_embeddings=64)
    optimizer = optax.sgd(1e-3)
    for mode, best in (("max", 2), ("min", 3)):
        ckpts = TrainCheckpoints(tmp_path / mode, keep=1, best_metric="accuracy", best_mode=mode)
        for step, accuracy in zip((1, 2, 3, 4), (0.5, 0.9, 0.2, 0.7), strict=True):
            params = {"w": jnp.full((4,), float(step))}
            state = step_lib.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                                        opt_state=optimizer.init(params))
            ckpts.save(state, iter(grain.MapDataset.range(4).to_iter_dataset()), tiny, {"seed": 0},
                       metrics={"accuracy": accuracy})
        ckpts.wait()
        assert ckpts.best_step() == best and ckpts.latest_step() == 4
        assert sorted(int(p.name) for p in (tmp_path / mode).iterdir() if p.name.isdigit()) == [best, 4]
        ckpts.close()


def test_a_mesh_larger_than_the_devices_is_named_once_with_the_cpu_hint():
    from mra_jax.training.config import MeshConfig
    from mra_jax.training.runtime import build_mesh

    count = jax.device_count()
    with pytest.raises(ValueError) as info:
        build_mesh(MeshConfig(data=2, fsdp=count))
    message = str(info.value)
    assert message == (f"mesh {{'data': 2, 'fsdp': {count}, 'tensor': 1}} needs {2 * count} devices, {count} "
                       f"available; on CPUs, XLA_FLAGS=--xla_force_host_platform_device_count={2 * count} (set before "
                       f"Python starts) makes {2 * count} devices")
    with pytest.raises(ValueError, match=r"mesh sizes must be positive or -1, got \{'fsdp': 0\}"):
        build_mesh(MeshConfig(fsdp=0))
