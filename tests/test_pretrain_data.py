"""Pretraining's data and tokenizer choices: a run from a prepared token store, the tokenizer taken from the store or
the model checkpoint, and every tokenizer that does not fit the model refused, naming both."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers

import mra_jax
from mra_jax.training import corpus, store
from mra_jax.training.config import PretrainConfig, load_config
from mra_jax.training.data import special_tokens, train_tokenizer
from mra_jax.training.pretrain import _tokenizer, model_config_for

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cfg(*overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, ROOT / "configs/pretrain/tiny.yaml", list(overrides))


def _word_tokenizer(size: int, pad: int = 1) -> Tokenizer:
    names = ["<s>", "<pad>", "</s>", "<unk>"]
    if pad != 1:
        names[1], names[pad] = names[pad], names[1]
    vocab = {n: i for i, n in enumerate(names)} | {f"w{i}": 4 + i for i in range(size - 5)}
    vocab["<mask>"] = size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    """An HF MRA checkpoint (100 ids, <pad> = 1) with its tokenizer.json beside the weights, as
    init_from_roberta.py writes it."""
    config = dataclasses.replace(mra_jax.MraConfig.from_pretrained(ROOT / "configs/models/mra-tiny.json"),
                                 vocab_size=100, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    out = tmp_path_factory.mktemp("model") / "mra-init"
    mra_jax.MraForMaskedLM(config, rngs=nnx.Rngs(0)).save_pretrained(out, format="hf")
    _word_tokenizer(100).save(str(out / "tokenizer.json"))
    return out


def test_a_checkpoint_brings_its_tokenizer(model_dir, tmp_path):
    cfg = _cfg(f"model={model_dir}", f"output_dir={tmp_path / 'run'}")
    tok, source = _tokenizer(cfg, tmp_path / "run")
    assert tok.to_str() == Tokenizer.from_file(str(model_dir / "tokenizer.json")).to_str()
    assert str(model_dir / "tokenizer.json") in source
    config, from_checkpoint = model_config_for(cfg, special_tokens(tok), source)
    assert from_checkpoint and config.vocab_size == 100


def test_a_checkpoint_without_a_tokenizer_is_refused(model_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.link(model_dir / name, bare / name)
    with pytest.raises(ValueError, match=r"is a checkpoint without a tokenizer .*set data\.tokenizer"):
        _tokenizer(_cfg(f"model={bare}"), tmp_path / "run")


@pytest.mark.parametrize(("tokenizer", "message"), [
    (lambda: _word_tokenizer(1000), r"it has 1000 ids, the model's vocabulary 100"),
    (lambda: _word_tokenizer(100, pad=3), r"its <pad> is id 3, the model's 1"),
    (lambda: train_tokenizer(corpus.generate(50), 300), r"it has \d+ ids, the model's vocabulary 100"),
])
def test_a_tokenizer_that_does_not_fit_the_model_is_refused(model_dir, tmp_path, tokenizer, message):
    path = tmp_path / "tokenizer.json"
    tokenizer().save(str(path))
    cfg = _cfg(f"model={model_dir}", f"data.tokenizer={path}")
    tok, source = _tokenizer(cfg, tmp_path / "run")
    with pytest.raises(ValueError, match=rf"the tokenizer \(data\.tokenizer {path}\) does not fit the model "
                                         rf"{model_dir}: .*{message}"):
        model_config_for(cfg, special_tokens(tok), source)


def test_the_store_tokenizer_is_the_run_tokenizer(tmp_path):
    docs = corpus.generate(60, seed=2)
    (tmp_path / "d.txt").write_text("\n".join(docs) + "\n")
    tok = train_tokenizer(docs, 300)
    store.prepare_store([str(tmp_path / "d.txt")], tmp_path / "s", tok, eval_fraction=0.1, progress=False)
    got, source = _tokenizer(_cfg(f"data.prepared={tmp_path / 's'}"), tmp_path / "run")
    assert got.to_str() == tok.to_str() and "token store" in source
    other = tmp_path / "other.json"
    train_tokenizer(docs, 280).save(str(other))
    with pytest.raises(ValueError, match=r"data\.tokenizer .*other\.json differs from the tokenizer of the token "
                                         "store"):
        _tokenizer(_cfg(f"data.prepared={tmp_path / 's'}", f"data.tokenizer={other}"), tmp_path / "run")


@pytest.mark.slow
def test_pretraining_from_a_prepared_store(tmp_path):
    """scripts/prepare_data.py, then scripts/pretrain.py data.prepared=DIR: trains from the store's sequences with
    its tokenizer, writes nothing of its own data into the run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    prep = subprocess.run([sys.executable, "scripts/prepare_data.py", "configs/data/tiny_corpus.jsonl", "--out",
                           str(tmp_path / "store"), "--vocab-size", "600", "--eval-fraction", "0.05", "--workers",
                           "1", "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr
    run = subprocess.run([sys.executable, "scripts/pretrain.py", "configs/pretrain/tiny.yaml",
                          f"data.prepared={tmp_path / 'store'}", f"output_dir={tmp_path / 'run'}", "steps=4",
                          "eval_every=4", "checkpoint_every=4", "log_every=1", "data.seq_len=64", "data.batch_size=4",
                          "optimizer.warmup_steps=1",
                          "progress_bar=false", "tensorboard=false"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "data.train_files and data.eval_files are not read" in run.stdout
    assert not (tmp_path / "run" / "data").exists()
    assert (Tokenizer.from_file(str(tmp_path / "run" / "tokenizer.json")).to_str()
            == Tokenizer.from_file(str(tmp_path / "store" / "tokenizer.json")).to_str())
    assert (tmp_path / "run" / "checkpoints" / "4").is_dir()
