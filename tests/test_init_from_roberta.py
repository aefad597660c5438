"""Long-context MRA initialisation from an HF RoBERTa masked LM: logits equal RoBERTa's when MRA selects every block
pair, the position table is tiled, the other formats convert alike, and bad input fails with nothing written."""

from __future__ import annotations

import json
import pathlib
import runpy
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
from flax import nnx
from helpers import rel_err
from safetensors.numpy import load_file

import mra_jax
from mra_jax.conversion import to_hf_state_dict
from mra_jax.conversion.roberta import mra_from_roberta

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "init_from_roberta.py"
init_main = runpy.run_path(str(SCRIPT))["main"]

ORIG_POSITIONS = 128  # RoBERTa's config counts the 2 offset rows: max_position_embeddings = 130
NEW_POSITIONS = 320  # not a multiple of 128, so the last copy is cut
POSITIONS = "mra.embeddings.position_embeddings.weight"


def _roberta_config(**overrides) -> transformers.RobertaConfig:
    kwargs = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                  max_position_embeddings=ORIG_POSITIONS + 2, pad_token_id=1, type_vocab_size=1)
    return transformers.RobertaConfig(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def roberta(tmp_path_factory) -> tuple[transformers.RobertaForMaskedLM, pathlib.Path]:
    """A tiny RoBERTa MLM with every parameter perturbed (biases and norms not at their init), as safetensors."""
    torch.manual_seed(0)
    model = transformers.RobertaForMaskedLM(_roberta_config()).eval()
    with torch.no_grad():
        for p in model.parameters():  # tied tensors appear once
            p.add_(0.05 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("roberta")
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def converted(roberta, tmp_path_factory) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
    """The CLI run once, in a subprocess; block_per_row 8 selects every pair of the test's 2 x 2 blocks."""
    out = tmp_path_factory.mktemp("mra") / "out"
    run = subprocess.run([sys.executable, str(SCRIPT), "--hf-dir", str(roberta[1]), "--out", str(out),
                          "--max-position-embeddings", str(NEW_POSITIONS), "--block-per-row", "8"],
                         capture_output=True, text=True, timeout=120)
    return out, run


@pytest.fixture(scope="module")
def mra(converted) -> tuple[mra_jax.MraForMaskedLM, Callable]:
    """The converted model and its logits under one jit (compiling once is faster than the eager first call)."""
    return (mra_jax.MraForMaskedLM.from_pretrained(converted[0]),
            nnx.jit(lambda model, ids, mask: model(ids, attention_mask=mask).logits))


def test_cli_writes_an_hf_mra_checkpoint(converted, roberta):
    out, run = converted
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == str(out) and len(lines) == 2 and "MraForMaskedLM" in lines[1]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MraForMaskedLM"] and config["model_type"] == "mra"
    assert (config["max_position_embeddings"], config["block_per_row"], config["layer_norm_eps"]) == (
        NEW_POSITIONS, 8, roberta[0].config.layer_norm_eps)
    written = load_file(out / "model.safetensors")
    expected = to_hf_state_dict(mra_jax.MraForMaskedLM.from_pretrained(out))  # as write_hf_checkpoint names them
    assert {k: (v.dtype, v.shape) for k, v in written.items()} == {k: (v.dtype, v.shape) for k, v in expected.items()}
    assert np.array_equal(written["mra.embeddings.position_ids"], np.arange(NEW_POSITIONS)[None] + 2)
    original = roberta[0].roberta.embeddings.position_embeddings.weight.detach().numpy()
    table = written[POSITIONS]
    assert table.shape == (NEW_POSITIONS + 2, 64) and np.array_equal(table[:2], original[:2])
    tiled = np.tile(original[2:], (-(-NEW_POSITIONS // ORIG_POSITIONS), 1))[:NEW_POSITIONS]
    assert np.array_equal(table[2:], tiled)
    assert np.array_equal(written["cls.predictions.bias"], roberta[0].lm_head.bias.detach().numpy())
    _, info = transformers.MraForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


@pytest.mark.parametrize("padded", [False, True])
def test_logits_equal_roberta_when_every_block_pair_is_selected(mra, roberta, padded):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 99, size=(2, 64))
    mask = np.ones_like(ids)
    if padded:  # padding at the end, so RoBERTa's positions of the real tokens are arange + 2 as MRA's
        mask[1, 41:] = 0
        ids[1, 41:] = 1
    model, logits = mra
    got = np.asarray(logits(model, ids, mask))
    with torch.no_grad():
        ref = roberta[0](input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    real = mask.astype(bool)
    errors = [rel_err(got[i][real[i]], ref[i][real[i]]) for i in range(2)]
    print(f"max relative logits error per row (padded={padded}): {errors[0]:.2e}, {errors[1]:.2e}")
    assert np.all(np.isfinite(got)) and all(e < 1e-4 for e in errors)  # (NaN compares False: fails here)


@pytest.mark.parametrize("fmt", ["bin", "sharded"])
def test_other_formats_convert_alike(fmt, roberta, converted, tmp_path):
    """pytorch_model.bin with the tied decoder (its bias as the only bias), old buffers and a pooler; sharded
    safetensors; 96 positions (a cut table)."""
    model, _ = roberta
    source = tmp_path / "roberta"
    if fmt == "bin":  # transformers 5 writes safetensors only: save the whole state_dict as old checkpoints have it
        source.mkdir()
        model.config.save_pretrained(source)
        state = dict(model.state_dict())
        state["roberta.embeddings.position_ids"] = torch.arange(ORIG_POSITIONS + 2)[None]
        state["roberta.pooler.dense.weight"] = torch.zeros(64, 64)
        state["roberta.pooler.dense.bias"] = torch.zeros(64)
        assert "lm_head.decoder.weight" in state
        del state["lm_head.bias"]  # the bias under its other name only
        torch.save(state, source / "pytorch_model.bin")
    else:
        model.save_pretrained(source, max_shard_size="50KB")
        assert len(list(source.glob("*.safetensors"))) > 1
    out = tmp_path / "out"
    calls = []
    if fmt == "bin":
        with pytest.warns(UserWarning, match="pooler is dropped.*roberta.pooler.dense.bias"):
            config = mra_from_roberta(source, out, max_position_embeddings=96, block_per_row=8,
                                      progress=lambda d, t: calls.append((d, t)))
    else:
        config = mra_from_roberta(source, out, max_position_embeddings=96, block_per_row=8,
                                  progress=lambda d, t: calls.append((d, t)))
    assert config.max_position_embeddings == 96 and calls[-1][0] == calls[-1][1]
    written, reference = load_file(out / "model.safetensors"), load_file(converted[0] / "model.safetensors")
    assert set(written) == set(reference)
    for key, value in written.items():
        if key not in (POSITIONS, "mra.embeddings.position_ids"):
            assert np.array_equal(value, reference[key]), key
    assert np.array_equal(written[POSITIONS], reference[POSITIONS][:98])


def _edit_config(directory: pathlib.Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _bin_checkpoint(model, directory: pathlib.Path, edit) -> None:
    directory.mkdir()
    model.config.save_pretrained(directory)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    edit(state)
    torch.save(state, directory / "pytorch_model.bin")


ERRORS = {
    "untied decoder": (lambda s: s["lm_head.decoder.weight"].add_(1.0), {}, {}, "differs from"),
    "untied decoder bias": (lambda s: s["lm_head.decoder.bias"].add_(1.0), {}, {}, "lm_head.decoder.bias differs"),
    "unexpected tensor": (lambda s: s.update(extra=torch.zeros(3)), {}, {}, "unexpected: extra"),
    "missing tensor": (lambda s: s.pop("roberta.encoder.layer.1.output.dense.bias"), {}, {},
                       "missing: roberta.encoder.layer.1.output.dense.bias"),
    "mis-shaped": (lambda s: s.update({"lm_head.bias": torch.zeros(98)}), {}, {}, r"mis-shaped: lm_head.bias \(98,\)"),
    "not roberta": (None, {"model_type": "bert"}, {}, "model_type is 'bert'"),
    "relative positions": (None, {"position_embedding_type": "relative_key"}, {}, "position_embedding_type"),
    "heads": (None, {"num_attention_heads": 3}, {}, "not divisible"),
    "positions not a multiple of 32": (None, {}, {"max_position_embeddings": 100}, "multiple of 32"),
    "bad approx mode": (None, {}, {"approx_mode": "dense"}, "approx_mode"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_input_raises_and_writes_nothing(case, roberta, tmp_path):
    edit, config_changes, kwargs, match = ERRORS[case]
    source = tmp_path / "roberta"
    _bin_checkpoint(roberta[0], source, edit or (lambda s: None))
    _edit_config(source, **config_changes)
    with pytest.raises(ValueError, match=match):
        mra_from_roberta(source, tmp_path / "out", **{"max_position_embeddings": 256, **kwargs})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["roberta"]  # no output, no temporary folder


def test_cli_reports_a_missing_hf_dir_in_one_line(tmp_path, capsys):
    code = init_main(["--hf-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "absent" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_the_tokenizer_goes_with_the_weights(roberta, tmp_path):
    """vocab.json + merges.txt become a tokenizer.json that gives transformers' ids; a tokenizer.json is copied."""
    from tokenizers import Tokenizer

    from mra_jax.training import corpus
    from mra_jax.training.data import train_tokenizer

    docs = corpus.generate(40, seed=4)
    model = json.loads(train_tokenizer(docs, 300).to_str())["model"]
    src = tmp_path / "roberta"
    src.mkdir()
    for f in roberta[1].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "vocab.json").write_text(json.dumps(model["vocab"]))
    (src / "merges.txt").write_text("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in model["merges"]))
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "RobertaTokenizer"}))
    mra_from_roberta(src, tmp_path / "out", max_position_embeddings=NEW_POSITIONS)
    ours = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(src))
    for text in [*docs[:20], " leading space", "two  spaces"]:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
    assert (tmp_path / "out" / "vocab.json").read_text() == (src / "vocab.json").read_text()
    (tmp_path / "out" / "tokenizer.json").rename(src / "tokenizer.json")
    mra_from_roberta(src, tmp_path / "out2", max_position_embeddings=NEW_POSITIONS)
    assert (tmp_path / "out2" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
