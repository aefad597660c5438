"""Inputs that once gave silent wrong answers: each now gives NaN (under jit, where nothing can be refused), the
documented meaning, or a clear error."""

from __future__ import annotations

import os
import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import worst

import mra_jax

CONFIG = mra_jax.MraConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=128).with_num_labels(3)


@pytest.fixture(scope="module")
def model():
    return mra_jax.MraForSequenceClassification(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward():
    return nnx.jit(lambda m, ids, mask, labels: m(ids, attention_mask=mask, labels=labels))


def _batch():
    ids = np.random.default_rng(0).integers(3, 50, (2, 64))
    mask = np.ones((2, 64), np.int32)
    mask[1, 40:] = 0
    return ids, mask


def test_negative_ids_under_jit_give_nan_not_another_row(model, forward):
    ids, mask = _batch()
    ids[0, 5] = -1  # once the last vocabulary row
    logits = np.asarray(forward(model, ids, mask, np.array([0, 1])).logits)
    assert np.isnan(logits[0]).all() and np.isfinite(logits[1]).all()
    with pytest.raises(ValueError, match=r"input_ids holds values outside \[0, 50\)"):
        model(ids, attention_mask=mask)  # concrete inputs are refused


def test_negative_labels_other_than_ignore_give_a_nan_loss(model, forward):
    ids, mask = _batch()
    assert np.isnan(forward(model, ids, mask, np.array([0, -5])).loss)
    assert np.isfinite(forward(model, ids, mask, np.array([0, 2])).loss)
    token = mra_jax.MraForTokenClassification(CONFIG, rngs=nnx.Rngs(0))
    labels = np.full((2, 64), -100)
    labels[:, 3] = 1
    f = nnx.jit(lambda m, y: m(ids, attention_mask=mask, labels=y).loss)
    assert np.isfinite(f(token, labels))  # -100 is ignored
    labels[0, 4] = -3
    assert np.isnan(f(token, labels))


def test_mask_values_of_one_or_more_are_tokens(model, forward):
    ids, mask = _batch()
    reference = np.asarray(forward(model, ids, mask, np.array([0, 1])).logits)
    for scaled in (mask * 2, mask * 3, mask.astype(np.float32) * 1.5, mask.astype(bool)):
        got = np.asarray(forward(model, ids, scaled, np.array([0, 1])).logits)
        np.testing.assert_array_equal(got, reference)
    q = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64, 2, 16)), jnp.float32)
    a = mra_jax.mra_attention(q, q, q, jnp.asarray(mask), num_blocks=4)
    b = mra_jax.mra_attention(q, q, q, jnp.asarray(mask * 3), num_blocks=4)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_int64_ids_beyond_int32_are_refused_before_the_cast(model):
    ids, mask = _batch()
    with pytest.raises(ValueError, match="input_ids holds values that do not fit in int32"):
        model(ids.astype(np.int64) + 2**40, attention_mask=mask)  # once read as id 16, 17, ...
    with pytest.raises(ValueError, match="token_type_ids holds values that do not fit in int32"):
        model(ids, attention_mask=mask, token_type_ids=np.full((2, 64), 2**33))


def test_exported_weights_get_the_usual_file_mode(model, tmp_path):
    model.save_pretrained(tmp_path / "hf", format="hf")
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~umask


def test_worst_error_is_never_fooled_by_nan():
    assert worst([1e-7, float("nan"), 2e-7]) == float("inf")
    assert worst([1e-7, 3e-7]) == 3e-7


def test_golden_parity_reports_nan_as_a_difference(capsys):
    module = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "scripts" / "golden_parity.py"))
    rows = [("logits", 1e-7, 1e-7), ("loss", float("nan"), float("nan")), ("hidden", 2e-7, 1e-7)]
    module["main"].__globals__["compare_model"] = lambda folder, attention="jnp": rows
    golden = pathlib.Path(__file__).parent / "fixtures" / "golden"
    assert module["main"](["--golden", str(golden)]) == 1
    assert "DIFFERS" in capsys.readouterr().out


def test_jax_jit_of_a_merged_model_stays_traceable(model):
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, attention_mask=m).logits)(state, *_batch())
    assert np.isfinite(np.asarray(out)).all()


def test_wrong_types_and_shapes_are_named(model):
    ids, mask = _batch()
    cases = [
        (dict(attention_mask=np.array([["1"] * 64] * 2)), "attention_mask must be a numeric array"),
        (dict(attention_mask=mask, position_ids=np.zeros((2, 64), np.float32)), "position_ids must be integers"),
        (dict(attention_mask=mask, token_type_ids=np.zeros((2, 64), np.float32)), "token_type_ids must be integers"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model(ids, **kwargs)
    token = mra_jax.MraForTokenClassification(CONFIG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"labels must be \[batch, seq\]"):
        token(ids, attention_mask=mask, labels=np.zeros((2,), np.int32))
    q = jnp.zeros((1, 64, 1, 16))
    with pytest.raises(ValueError, match=r"num_blocks must be a positive integer, got 2\.5"):
        mra_jax.mra_attention(q, q, q, None, num_blocks=2.5)
    with pytest.raises(ValueError, match="seq = 0"):
        mra_jax.mra_attention(q[:, :0], q[:, :0], q[:, :0], None, num_blocks=4)


@pytest.fixture(scope="module")
def orbax_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("orbax") / "ok"
    mra_jax.MraModel(CONFIG, rngs=nnx.Rngs(0)).save_pretrained(out)
    return out


@pytest.mark.parametrize(("damage", "message"), [
    ("no_metadata", "missing _METADATA"),
    ("emptied", "missing _METADATA, manifest.ocdbt, d"),
    ("no_manifest", "missing manifest.ocdbt"),
    ("truncated", r"tensor\(s\) cannot be read \(a data file is truncated, damaged or missing\): [\w.]+ "),
])
def test_damaged_orbax_checkpoints_name_the_problem(orbax_checkpoint, tmp_path, damage, message):
    import shutil

    out = tmp_path / "ckpt"
    shutil.copytree(orbax_checkpoint, out)
    params = out / "params"
    if damage == "no_metadata":
        (params / "_METADATA").unlink()
    elif damage == "emptied":
        for p in params.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif damage == "no_manifest":
        (params / "manifest.ocdbt").unlink()
    else:
        data = [p for p in params.rglob("*") if p.is_file() and "ocdbt.process" in str(p) and "/d/" in str(p)]
        for f in data:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=message):
        mra_jax.MraModel.from_pretrained(out)


def test_a_config_without_size_fields_is_named_when_the_weights_disagree(orbax_checkpoint, tmp_path):
    import json
    import shutil

    out = tmp_path / "ckpt"
    shutil.copytree(orbax_checkpoint, out)
    config = json.loads((out / "config.json").read_text())
    del config["hidden_size"], config["intermediate_size"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not set hidden_size \(default 768\), intermediate_size"):
        mra_jax.MraModel.from_pretrained(out)


def test_non_finite_weights_are_refused_with_their_names(tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    golden = pathlib.Path(__file__).parent / "fixtures" / "golden" / "model_base"
    out = tmp_path / "hf"
    shutil.copytree(golden, out)
    tensors = load_file(out / "model.safetensors")
    tensors["encoder.layer.1.output.dense.bias"][3] = np.nan
    tensors["embeddings.word_embeddings.weight"][0, 0] = np.inf
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"non-finite values .* in .*embeddings\.word_embeddings\.weight.*"
                                         r"encoder\.layer\.1\.output\.dense\.bias"):
        mra_jax.MraModel.from_pretrained(out)


def test_orbax_content_that_differs_from_its_checksums_is_refused(orbax_checkpoint, tmp_path):
    import shutil

    out = tmp_path / "ckpt"
    shutil.copytree(orbax_checkpoint, out)
    assert (out / "checksums.json").is_file()
    mra_jax.MraModel.from_pretrained(out)  # intact: loads
    other = tmp_path / "other"
    mra_jax.MraModel(CONFIG, rngs=nnx.Rngs(1)).save_pretrained(other)  # finite, well-formed, different values
    shutil.rmtree(out / "params")
    shutil.copytree(other / "params", out / "params")
    with pytest.raises(ValueError, match=r"is corrupted: the content of .* differs from the checksum"):
        mra_jax.MraModel.from_pretrained(out)
