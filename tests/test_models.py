"""Behaviour of the six models: jit/grad, input errors, dropout, losses, initialisation, loading errors."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import GOLDEN, rel_err

import mra_jax
from mra_jax.conversion.hf_names import hf_name

CONFIG = mra_jax.MraConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=128, type_vocab_size=2, block_per_row=2,
                           id2label={0: "a", 1: "b", 2: "c"})
B, S = 2, 96


def _batch(seed: int = 0, seq: int = S, lengths=(S, 70)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, CONFIG.vocab_size, (B, seq))
    mask = (np.arange(seq)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return jnp.asarray(np.where(mask, ids, CONFIG.pad_token_id)), jnp.asarray(mask)


def _labels(cls, ids):
    rng = np.random.default_rng(1)
    if cls is mra_jax.MraForMaskedLM:
        return {"labels": jnp.where(rng.random(ids.shape) < 0.3, ids, -100)}
    if cls is mra_jax.MraForSequenceClassification:
        return {"labels": jnp.asarray(rng.integers(0, 3, ids.shape[0]))}
    if cls is mra_jax.MraForMultipleChoice:
        return {"labels": jnp.asarray(rng.integers(0, 3, ids.shape[0]))}
    if cls is mra_jax.MraForTokenClassification:
        return {"labels": jnp.asarray(rng.integers(0, 3, ids.shape))}
    if cls is mra_jax.MraForQuestionAnswering:
        return {"start_positions": jnp.asarray([3, 10]), "end_positions": jnp.asarray([5, 200])}
    return {}


def _inputs(cls, seed: int = 0):
    ids, mask = _batch(seed)
    if cls is mra_jax.MraForMultipleChoice:
        ids, mask = jnp.stack([ids] * 3, axis=1), jnp.stack([mask] * 3, axis=1)
    return {"input_ids": ids, "attention_mask": mask, **_labels(cls, ids)}


HEADS = [mra_jax.MraForMaskedLM, mra_jax.MraForSequenceClassification, mra_jax.MraForMultipleChoice,
         mra_jax.MraForTokenClassification, mra_jax.MraForQuestionAnswering]


@pytest.mark.slow
@pytest.mark.parametrize("cls", [mra_jax.MraModel, *HEADS])
def test_jit_forward_and_grad(cls):
    model = cls(CONFIG, rngs=nnx.Rngs(0))
    inputs = _inputs(cls)
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def forward(params, inputs):
        return nnx.merge(graphdef, params)(**inputs)

    eager = model(**inputs)
    jitted = forward(params, inputs)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    if cls is mra_jax.MraModel:
        loss_fn = lambda p: jnp.mean(nnx.merge(graphdef, p)(**inputs).last_hidden_state ** 2)  # noqa: E731
    else:
        loss_fn = lambda p: nnx.merge(graphdef, p)(**inputs).loss  # noqa: E731
    grads = jax.jit(jax.grad(loss_fn))(params)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0


def test_hidden_states_and_output_fields():
    model = mra_jax.MraModel(CONFIG, rngs=nnx.Rngs(0))
    ids, mask = _batch()
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == CONFIG.num_hidden_layers + 1
    np.testing.assert_array_equal(np.asarray(out.hidden_states[-1]), np.asarray(out.last_hidden_state))
    assert model(ids, attention_mask=mask).hidden_states is None
    qa = mra_jax.MraForQuestionAnswering(CONFIG, rngs=nnx.Rngs(0))
    out = qa(ids, attention_mask=mask)
    assert out.start_logits.shape == out.end_logits.shape == (B, S) and out.loss is None
    assert qa.config.num_labels == 2


@pytest.mark.parametrize("seq", [1, 37, 100])
def test_lengths_not_multiple_of_32_equal_explicit_padding(seq):
    model = mra_jax.MraForMaskedLM(CONFIG, rngs=nnx.Rngs(0))
    ids, _ = _batch(seq=128, lengths=(128, 128))
    mask = (jnp.arange(128)[None] < jnp.asarray([seq, max(seq // 2, 1)])[:, None]).astype(jnp.int32)
    padded = model(ids, attention_mask=mask).logits[:, :seq]
    short = model(ids[:, :seq], attention_mask=mask[:, :seq]).logits
    np.testing.assert_allclose(np.asarray(short), np.asarray(padded), rtol=1e-5, atol=1e-5)


def test_all_padding_row_is_finite():
    model = mra_jax.MraForSequenceClassification(CONFIG, rngs=nnx.Rngs(0))
    ids, _ = _batch()
    mask = jnp.stack([jnp.ones(S, jnp.int32), jnp.zeros(S, jnp.int32)])
    graphdef, params = nnx.split(model, nnx.Param)
    loss, grads = jax.value_and_grad(
        lambda p: nnx.merge(graphdef, p)(ids, attention_mask=mask, labels=jnp.asarray([0, 1])).loss)(params)
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_inputs_embeds_and_position_ids():
    model = mra_jax.MraModel(CONFIG, rngs=nnx.Rngs(0))
    ids, mask = _batch()
    ref = model(ids, attention_mask=mask).last_hidden_state
    embeds = model.embeddings.word_embeddings(ids)
    np.testing.assert_allclose(np.asarray(model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state),
                               np.asarray(ref), rtol=1e-6, atol=1e-6)
    positions = jnp.arange(S)[None] + 2
    np.testing.assert_array_equal(np.asarray(model(ids, attention_mask=mask, position_ids=positions)
                                             .last_hidden_state), np.asarray(ref))
    # Explicit position ids allow inputs longer than the default positions would.
    long_ids = jnp.ones((1, 160), jnp.int32) * 5
    out = model(long_ids, position_ids=jnp.zeros((1, 160), jnp.int32))
    assert out.last_hidden_state.shape == (1, 160, CONFIG.hidden_size)


def test_dropout_only_when_asked():
    model = mra_jax.MraForTokenClassification(CONFIG, rngs=nnx.Rngs(0))
    ids, mask = _batch()
    a, b = model(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = model(ids, attention_mask=mask, deterministic=False, rngs=nnx.Rngs(dropout=1)).logits
    d = model(ids, attention_mask=mask, deterministic=False, rngs=jax.random.key(2)).logits
    assert not np.allclose(np.asarray(a), np.asarray(c)) and not np.allclose(np.asarray(c), np.asarray(d))
    with pytest.raises(ValueError, match="dropout needs rngs"):
        model(ids, attention_mask=mask, deterministic=False)


def test_masked_lm_loss_ignores_minus_100():
    model = mra_jax.MraForMaskedLM(CONFIG, rngs=nnx.Rngs(0))
    ids, mask = _batch()
    labels = jnp.full(ids.shape, -100).at[0, 3].set(7).at[1, 5].set(9)
    out = model(ids, attention_mask=mask, labels=labels)
    logp = jax.nn.log_softmax(out.logits)
    np.testing.assert_allclose(float(out.loss), -float(logp[0, 3, 7] + logp[1, 5, 9]) / 2, rtol=1e-6)


def test_sequence_classification_problem_types():
    ids, mask = _batch()
    one = mra_jax.MraForSequenceClassification(CONFIG.with_num_labels(1), rngs=nnx.Rngs(0))
    target = jnp.asarray([0.5, -1.0])
    out = one(ids, attention_mask=mask, labels=target)
    np.testing.assert_allclose(float(out.loss), float(jnp.mean((out.logits[:, 0] - target) ** 2)), rtol=1e-6)
    multi = mra_jax.MraForSequenceClassification(CONFIG, rngs=nnx.Rngs(0))
    targets = jnp.asarray([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    out = multi(ids, attention_mask=mask, labels=targets)
    want = optax.sigmoid_binary_cross_entropy(out.logits, targets).mean()
    np.testing.assert_allclose(float(out.loss), float(want), rtol=1e-6)
    out = multi(ids, attention_mask=mask, labels=jnp.asarray([2, 0]))
    logp = jax.nn.log_softmax(out.logits)
    np.testing.assert_allclose(float(out.loss), -float(logp[0, 2] + logp[1, 0]) / 2, rtol=1e-6)


def test_token_classification_loss_skips_padding():
    model = mra_jax.MraForTokenClassification(CONFIG, rngs=nnx.Rngs(0))
    ids, mask = _batch()
    labels = jnp.ones(ids.shape, jnp.int32)
    out = model(ids, attention_mask=mask, labels=labels)
    logp = jax.nn.log_softmax(out.logits)[..., 1]
    np.testing.assert_allclose(float(out.loss), -float((logp * mask).sum() / mask.sum()), rtol=1e-5)


def test_question_answering_clamps_positions():
    model = mra_jax.MraForQuestionAnswering(CONFIG, rngs=nnx.Rngs(0))
    ids, mask = _batch()
    out = model(ids, attention_mask=mask, start_positions=jnp.asarray([3, -4]), end_positions=jnp.asarray([500, 7]))
    start, end = jax.nn.log_softmax(out.start_logits), jax.nn.log_softmax(out.end_logits)
    # start: 3 and clamp(-4) = 0; end: clamp(500) = S is ignored, 7.
    want = (-(start[0, 3] + start[1, 0]) / 2 - end[1, 7]) / 2
    np.testing.assert_allclose(float(out.loss), float(want), rtol=1e-5)


def test_multiple_choice_logits_shape():
    model = mra_jax.MraForMultipleChoice(CONFIG, rngs=nnx.Rngs(0))
    out = model(**_inputs(mra_jax.MraForMultipleChoice))
    assert out.logits.shape == (B, 3)


def test_hf_initialisation():
    model = mra_jax.MraForMaskedLM(CONFIG, rngs=nnx.Rngs(0))
    params = {hf_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert np.all(params["mra.embeddings.word_embeddings.weight"][CONFIG.pad_token_id] == 0)
    assert np.all(params["cls.predictions.bias"] == 0)
    for name, value in params.items():
        if "LayerNorm.weight" in name:
            assert np.all(value == 1), name
        elif name.endswith("bias"):
            assert np.all(value == 0), name
        else:
            assert abs(float(value.std()) - CONFIG.initializer_range) < 0.004, name


def test_bfloat16_model_close_to_float32():
    model = mra_jax.MraForMaskedLM(CONFIG, rngs=nnx.Rngs(0))
    low = mra_jax.MraForMaskedLM(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    ids, mask = _batch()
    ref, out = model(ids, attention_mask=mask).logits, low(ids, attention_mask=mask).logits
    assert out.dtype == jnp.bfloat16
    assert rel_err(out.astype(jnp.float32) * mask[..., None], ref * mask[..., None]) < 2e-2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(input_ids=jnp.ones((1, 129), jnp.int32)), "exceeds max_position_embeddings"),
        (dict(input_ids=jnp.asarray([[5, 99, 3]])), r"input_ids holds values outside \[0, 99\)"),
        (dict(input_ids=jnp.asarray([[5, -1, 3]])), "input_ids holds values outside"),
        (dict(input_ids=jnp.ones((1, 8), jnp.int32), attention_mask=jnp.ones((1, 9))), "attention_mask must be"),
        (dict(input_ids=jnp.ones((1, 8), jnp.int32), token_type_ids=jnp.full((1, 8), 2)), "token_type_ids holds"),
        (dict(input_ids=jnp.ones((8,), jnp.int32)), r"input_ids must be \[batch, seq\]"),
        (dict(input_ids=jnp.ones((1, 8)), ), "input_ids must be integers"),
        (dict(), "exactly one of input_ids and inputs_embeds"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, message):
    model = mra_jax.MraModel(CONFIG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_multiple_choice_needs_choice_axis():
    model = mra_jax.MraForMultipleChoice(CONFIG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[batch, num_choices, seq\]"):
        model(jnp.ones((2, 32), jnp.int32))


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(GOLDEN / "model_sequence_classification", path)
    (path / "golden_io.npz").unlink()
    return path


def _rewrite(path, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_strict_loading_lists_every_problem(checkpoint):
    def edit(t):
        del t["classifier.dense.bias"]
        del t["mra.encoder.layer.1.output.dense.weight"]
        t["mra.extra.weight"] = np.zeros(3, np.float32)
        t["classifier.out_proj.weight"] = np.zeros((4, 128), np.float32)

    _rewrite(checkpoint, edit)
    with pytest.raises(ValueError) as info:
        mra_jax.MraForSequenceClassification.from_pretrained(checkpoint)
    message = str(info.value)
    for name in ("classifier.dense.bias", "mra.encoder.layer.1.output.dense.weight", "mra.extra.weight",
                 "classifier.out_proj.weight: checkpoint (4, 128), model expects (3, 128)"):
        assert name in message


def test_loading_errors_name_the_file(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mra_jax.MraModel.from_pretrained(tmp_path / "nowhere")
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read safetensors file .*model\.safetensors"):
        mra_jax.MraForSequenceClassification.from_pretrained(checkpoint)
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        mra_jax.MraForSequenceClassification.from_pretrained(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["num_attention_heads"] = 3
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        mra_jax.MraForSequenceClassification.from_pretrained(checkpoint)


def test_nnx_jit_and_optimizer_train():
    """Models hold a hashable config, so nnx.jit and nnx.Optimizer work; a few Adam steps reduce the loss."""
    model = mra_jax.MraForMaskedLM(CONFIG, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    ids, mask = _batch()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: m(ids, attention_mask=mask, labels=ids).loss)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(4)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(("cls", "head_calls"), [
    (mra_jax.MraModel, 0), (mra_jax.MraForMaskedLM, 0), (mra_jax.MraForSequenceClassification, 2),
    (mra_jax.MraForMultipleChoice, 0), (mra_jax.MraForTokenClassification, 1), (mra_jax.MraForQuestionAnswering, 0)])
def test_dropout_sites_are_hfs(cls, head_calls, monkeypatch):
    """HF applies dropout after the embeddings, after each attention output and FFN output, and in the heads:
    twice in the sequence-classification head, once before the token classifier, nowhere else."""
    from mra_jax.modeling.common import Dropout

    calls = []
    original = Dropout.__call__

    def counting(self, x, deterministic, rngs):
        calls.append(x.shape)
        return original(self, x, deterministic, rngs)

    monkeypatch.setattr(Dropout, "__call__", counting)
    model = cls(CONFIG, rngs=nnx.Rngs(0))
    inputs = {k: v for k, v in _inputs(cls).items() if k in ("input_ids", "attention_mask")}
    model(**inputs, deterministic=False, rngs=nnx.Rngs(dropout=0))
    assert len(calls) == 1 + 2 * CONFIG.num_hidden_layers + head_calls


def test_every_parameter_gets_a_gradient():
    model = mra_jax.MraForSequenceClassification(CONFIG, rngs=nnx.Rngs(0))
    inputs = _inputs(mra_jax.MraForSequenceClassification)
    graphdef, params = nnx.split(model, nnx.Param)
    grads = jax.grad(lambda p: nnx.merge(graphdef, p)(**inputs).loss)(params)
    zero = [hf_name(p) for p, g in nnx.to_flat_state(grads) if not np.any(np.asarray(g.get_value()))]
    assert zero == []


def test_inputs_may_be_lists_and_numpy():
    model = mra_jax.MraForSequenceClassification(CONFIG, rngs=nnx.Rngs(0))
    ids, mask = _batch()
    ref = model(ids, attention_mask=mask, labels=jnp.asarray([0, 2]))
    out = model(np.asarray(ids).tolist(), attention_mask=np.asarray(mask), labels=[0, 2])
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), rtol=1e-6)
    assert float(out.loss) == float(ref.loss)


@pytest.mark.parametrize(("cls", "labels", "message"), [
    (mra_jax.MraForSequenceClassification, {"labels": [0, -1]}, r"labels must be in \[0, 3\) or -100"),
    (mra_jax.MraForSequenceClassification, {"labels": [0, 3]}, r"labels must be in \[0, 3\)"),
    (mra_jax.MraForSequenceClassification, {"labels": [[1.0, 0.0], [0.0, 1.0]]}, "logits' shape"),
    (mra_jax.MraForMaskedLM, {"labels": np.full((B, S), 99)}, r"labels must be in \[0, 99\)"),
    (mra_jax.MraForMultipleChoice, {"labels": [[0], [1]]}, r"labels must have shape \(2,\)"),
    (mra_jax.MraForQuestionAnswering, {"start_positions": [1.5, 2.0], "end_positions": [1, 2]}, "positions must be"),
])
def test_bad_labels_raise_clear_errors(cls, labels, message):
    model = cls(CONFIG, rngs=nnx.Rngs(0))
    inputs = {k: v for k, v in _inputs(cls).items() if k in ("input_ids", "attention_mask")}
    with pytest.raises(ValueError, match=message):
        model(**inputs, **labels)
