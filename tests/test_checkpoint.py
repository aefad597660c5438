"""HF checkpoints (safetensors, sharded, .bin) -> Orbax -> HF, cross-head loading, sharded restore, failures."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import runpy
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import GOLDEN, MODEL_CASES, worst
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

import mra_jax
from mra_jax.sharding import make_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SCRIPTS = pathlib.Path(__file__).parents[1] / "scripts"
convert = runpy.run_path(str(SCRIPTS / "convert_hf_to_orbax.py"))["main"]
export = runpy.run_path(str(SCRIPTS / "export_to_hf.py"))["main"]
compare_model = runpy.run_path(str(SCRIPTS / "golden_parity.py"))["compare_model"]

CLASS_NAMES = ["MraModel", "MraForMaskedLM", "MraForSequenceClassification", "MraForMultipleChoice",
               "MraForTokenClassification", "MraForQuestionAnswering"]
TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def _params(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _hf_model(name: str):
    torch.manual_seed(0)
    config = transformers.MraConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=128, type_vocab_size=2,
                                    num_labels=3)
    return getattr(transformers, name)(config).eval()


def _write_hf(model, directory: pathlib.Path, fmt: str) -> dict[str, np.ndarray]:
    """Save in one of three formats; returns the tensors as written."""
    if fmt == "bin":  # as the 2023 hub checkpoints: the whole state_dict, tied decoder keys included
        directory.mkdir()
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(directory)
        state = model.state_dict()
        torch.save(state, directory / "pytorch_model.bin")
        return {k: v.numpy() for k, v in state.items()}
    model.save_pretrained(directory, max_shard_size="100KB" if fmt == "sharded" else "5GB")
    files = sorted(directory.glob("*.safetensors"))
    assert (len(files) > 1) == (fmt == "sharded")
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
@pytest.mark.parametrize("name", CLASS_NAMES)
def test_hf_to_orbax_to_hf_is_bitwise(name, fmt, tmp_path):
    original = _write_hf(_hf_model(name), tmp_path / "hf", fmt)
    assert convert(["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "orbax")]) == 0
    assert export(["--checkpoint", str(tmp_path / "orbax"), "--out", str(tmp_path / "back")]) == 0
    exported = load_file(tmp_path / "back" / "model.safetensors")
    assert set(exported) == set(original) - set(TIED)
    for key, value in exported.items():
        assert value.dtype == original[key].dtype and np.array_equal(value, original[key]), key
    _, info = getattr(transformers, name).from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    direct = getattr(mra_jax, name).from_pretrained(tmp_path / "hf")
    restored = getattr(mra_jax, name).from_pretrained(tmp_path / "orbax")
    for key, value in _params(direct).items():
        assert np.array_equal(value, _params(restored)[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("case", MODEL_CASES)
def test_golden_checkpoints_convert_and_match(case, tmp_path):
    shutil.copytree(GOLDEN / case, tmp_path / "hf")
    assert convert(["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "orbax")]) == 0
    shutil.copy(GOLDEN / case / "golden_io.npz", tmp_path / "orbax")
    rows = compare_model(tmp_path / "orbax")
    assert worst(err for _, err, _ in rows) < 1e-4, rows
    z = np.load(GOLDEN / case / "golden_io.npz")
    inputs = {k: z[k] for k in z.files if not k.startswith(("out_", "grad/"))}
    cls = mra_jax.model_class(mra_jax.MraConfig.from_pretrained(GOLDEN / case))
    direct, restored = (cls.from_pretrained(p)(**inputs) for p in (GOLDEN / case, tmp_path / "orbax"))
    for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(restored), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_conversion(tmp_path):
    assert convert(["--hf-dir", str(GOLDEN / "model_base"), "--out", str(tmp_path / "o"), "--dtype", "bfloat16"]) == 0
    model = mra_jax.MraModel.from_pretrained(tmp_path / "o", param_dtype=jax.numpy.bfloat16)
    assert {v.dtype for v in _params(model).values()} == {np.dtype(jax.numpy.bfloat16)}


@pytest.mark.parametrize("path", ["hf", "orbax"])
def test_restore_directly_sharded_on_a_mesh(path, tmp_path):
    assert len(jax.devices()) == 8
    directory = GOLDEN / "model_masked_lm"
    if path == "orbax":
        mra_jax.MraForMaskedLM.from_pretrained(directory).save_pretrained(tmp_path / "o")
        directory = tmp_path / "o"
    mesh = make_mesh(data=2, fsdp=4)
    model = mra_jax.MraForMaskedLM.from_pretrained(directory, mesh=mesh, rules="fsdp")
    flat = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    query = flat["mra/encoder/layer/0/attention/self/query/kernel"]
    assert query.sharding == NamedSharding(mesh, PartitionSpec("fsdp", None))
    assert len(query.addressable_shards) == 8 and query.addressable_shards[0].data.shape == (32, 128)
    assert flat["mra/embeddings/word_embeddings/embedding"].sharding.spec == PartitionSpec(None, "fsdp")
    assert flat["cls/predictions/bias"].sharding.spec == PartitionSpec(None)
    reference = _params(mra_jax.MraForMaskedLM.from_pretrained(GOLDEN / "model_masked_lm"))
    for key, value in flat.items():
        assert np.array_equal(np.asarray(value), reference[key]), key


def test_masked_lm_checkpoint_fine_tunes_any_head(tmp_path):
    mlm = mra_jax.MraForMaskedLM.from_pretrained(GOLDEN / "model_masked_lm")
    for cls in (mra_jax.MraForSequenceClassification, mra_jax.MraForQuestionAnswering,
                mra_jax.MraForTokenClassification, mra_jax.MraForMultipleChoice):
        with pytest.warns(UserWarning) as record:
            model = cls.from_pretrained(GOLDEN / "model_masked_lm", num_labels=5)
        messages = " ".join(str(r.message) for r in record)
        assert "dropped: cls.predictions.bias" in messages and "newly initialised" in messages
        for key, value in _params(model.mra).items():
            assert np.array_equal(value, _params(mlm.mra)[key])
        head = {k: v for k, v in _params(model).items() if not k.startswith("mra/")}
        assert head and all(np.all(np.isfinite(v)) for v in head.values())
    assert mra_jax.MraForSequenceClassification.from_pretrained(
        GOLDEN / "model_masked_lm", num_labels=5).classifier.out_proj.kernel.shape == (128, 5)


def test_base_checkpoint_into_a_head_and_head_into_base(tmp_path):
    with pytest.warns(UserWarning, match="newly initialised: qa_outputs.bias, qa_outputs.weight"):
        qa = mra_jax.MraForQuestionAnswering.from_pretrained(GOLDEN / "model_base")
    base = mra_jax.MraModel.from_pretrained(GOLDEN / "model_base")
    assert all(np.array_equal(v, _params(base)[k]) for k, v in _params(qa.mra).items())
    with pytest.warns(UserWarning, match="dropped: classifier.dense.bias"):
        mra_jax.MraModel.from_pretrained(GOLDEN / "model_sequence_classification")
    # The same through the converter's --architecture.
    assert convert(["--hf-dir", str(GOLDEN / "model_masked_lm"), "--out", str(tmp_path / "o"),
                    "--architecture", "MraForTokenClassification"]) == 0
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["architectures"] == ["MraForTokenClassification"]
    mra_jax.MraForTokenClassification.from_pretrained(tmp_path / "o")


def test_cross_head_loading_still_needs_every_encoder_tensor(tmp_path, capsys):
    directory = _broken(tmp_path, _edit_tensors(_drop_encoder_tensor))
    with pytest.raises(ValueError, match=r"missing tensors: mra\.encoder\.layer\.0\.attention\.self\.key\.bias"):
        mra_jax.MraForSequenceClassification.from_pretrained(directory)
    out = tmp_path / "out"
    assert convert(["--hf-dir", str(directory), "--out", str(out), "--architecture", "MraModel"]) == 1
    assert "missing tensors: encoder.layer.0.attention.self.key.bias" in capsys.readouterr().err
    assert not out.exists()


def _broken(tmp_path: pathlib.Path, edit) -> pathlib.Path:
    directory = tmp_path / "broken"
    shutil.copytree(GOLDEN / "model_masked_lm", directory)
    (directory / "golden_io.npz").unlink()
    edit(directory)
    return directory


def _edit_tensors(change):
    def edit(directory):
        tensors = load_file(directory / "model.safetensors")
        change(tensors)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return edit


def _drop_encoder_tensor(t):
    del t["mra.encoder.layer.0.attention.self.key.bias"]


FAILURES = {
    "missing": (_edit_tensors(_drop_encoder_tensor), "missing tensors: mra.encoder.layer.0.attention.self.key.bias"),
    "unexpected": (_edit_tensors(lambda t: t.update({"mra.encoder.layer.2.output.dense.bias": np.zeros(128)})),
                   "unexpected tensors: mra.encoder.layer.2.output.dense.bias"),
    "shape": (_edit_tensors(lambda t: t.update({"cls.predictions.bias": np.zeros(98, np.float32)})),
              r"cls.predictions.bias: checkpoint \(98,\), model expects \(99,\)"),
    "head_missing": (_edit_tensors(lambda t: t.pop("cls.predictions.transform.dense.bias")),
                     "missing tensors: cls.predictions.transform.dense.bias"),
    "truncated": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
                  "cannot read safetensors file .*model.safetensors"),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), "no weights in"),
    "bad_config": (lambda d: (d / "config.json").write_text("{"), "config.json is not valid JSON"),
    "bad_index": (lambda d: ((d / "model.safetensors").rename(d / "part-1.safetensors"),
                             (d / "model.safetensors.index.json").write_text(
                                 '{"weight_map": {"a": "part-2.safetensors"}}')),
                  "shard part-2.safetensors named in .*index.json does not exist"),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_failures_exit_nonzero_name_the_problem_and_leave_nothing(failure, tmp_path, capsys):
    edit, message = FAILURES[failure]
    directory = _broken(tmp_path, edit)
    out = tmp_path / "out"
    assert convert(["--hf-dir", str(directory), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]


def test_existing_output_needs_force_and_force_replaces_only_checkpoints(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    assert convert(["--hf-dir", str(GOLDEN / "model_base"), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and (out / "notes.txt").exists()
    assert convert(["--hf-dir", str(GOLDEN / "model_base"), "--out", str(out), "--force"]) == 1
    assert "not a checkpoint directory" in capsys.readouterr().err and (out / "notes.txt").exists()
    (out / "notes.txt").unlink()  # an empty directory may be replaced
    assert convert(["--hf-dir", str(GOLDEN / "model_base"), "--out", str(out), "--force"]) == 0
    assert (out / "params").is_dir()
    assert convert(["--hf-dir", str(GOLDEN / "model_base"), "--out", str(out), "--force"]) == 0  # a checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "file").write_text("x")
    assert convert(["--hf-dir", str(GOLDEN / "model_base"), "--out", str(tmp_path / "file" / "sub")]) == 1
    assert "is a file" in capsys.readouterr().err
    assert export(["--checkpoint", str(out), "--out", str(out)]) == 1
    assert export(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x").exists()


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = mra_jax.MraModel.from_pretrained(GOLDEN / "model_base")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("mra_jax.modeling.models.save_params", fail)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


def test_heads_sharing_a_name_are_not_mixed(tmp_path):
    """Token classification and multiple choice both call their last layer `classifier`: a checkpoint of one
    gives the other a wholly new head."""
    hf = _hf_model("MraForTokenClassification")
    _write_hf(hf, tmp_path / "tok", "safetensors")
    with pytest.warns(UserWarning, match="dropped: classifier.bias, classifier.weight"):
        model = mra_jax.MraForMultipleChoice.from_pretrained(tmp_path / "tok")
    assert model.classifier.kernel.shape == (64, 1)


def test_decoder_weight_must_be_the_tied_embeddings(tmp_path):
    state = _hf_model("MraForMaskedLM").state_dict()
    state["cls.predictions.decoder.weight"] = torch.zeros(5, 5)
    directory = tmp_path / "bin"
    directory.mkdir()
    _hf_model("MraForMaskedLM").config.save_pretrained(directory)
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"decoder\.weight: checkpoint \(5, 5\), but the decoder is tied"):
        mra_jax.MraForMaskedLM.from_pretrained(directory)
    config = mra_jax.MraConfig.from_pretrained(directory)
    with pytest.raises(ValueError, match="tie_word_embeddings=False is not supported"):
        mra_jax.MraForMaskedLM(dataclasses.replace(config, tie_word_embeddings=False), rngs=nnx.Rngs(0))


def test_legacy_and_malformed_bin_files(tmp_path):
    hf = _hf_model("MraModel")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    hf.config.architectures = ["MraModel"]
    hf.config.save_pretrained(legacy)
    torch.save(hf.state_dict(), legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    model = mra_jax.MraModel.from_pretrained(legacy)
    want = hf.state_dict()["embeddings.word_embeddings.weight"].numpy()
    assert np.array_equal(np.asarray(model.embeddings.word_embeddings.embedding[...]), want)
    torch.save({"model": hf.state_dict(), "step": 5}, legacy / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin does not hold a state_dict"):
        mra_jax.MraModel.from_pretrained(legacy)


def test_written_checkpoints_have_normal_permissions(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        mra_jax.MraModel.from_pretrained(GOLDEN / "model_base").save_pretrained(tmp_path / "o")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "o").stat().st_mode) == 0o755


def test_mesh_without_the_rules_axes_is_a_clear_error():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(8), ("x",))
    with pytest.raises(ValueError, match="sharding rules use mesh axes"):
        mra_jax.MraModel.from_pretrained(GOLDEN / "model_base", mesh=mesh, rules="fsdp")


def test_temporary_folders_of_dead_writers_are_removed(tmp_path):
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    stale = tmp_path / f".o.tmp-{child.pid}-abc"
    (stale / "params").mkdir(parents=True)
    mra_jax.MraModel.from_pretrained(GOLDEN / "model_base").save_pretrained(tmp_path / "o")
    assert not stale.exists() and (tmp_path / "o" / "params").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


_KILLED_REPLACE = """
import os, pathlib, signal, sys
import mra_jax.atomic as atomic

out = pathlib.Path(sys.argv[1])
atomic._exchange = lambda a, b: False  # the two-rename path, as on a system without an atomic exchange
rename = pathlib.Path.rename

def rename_then_die(self, target):
    result = rename(self, target)
    if ".old-" in str(target):  # the old checkpoint moved aside, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    return result

pathlib.Path.rename = rename_then_die
with atomic.atomic_directory(out, force=True) as tmp:
    (tmp / "config.json").write_text("new")
    (tmp / "model.safetensors").write_text("new")
"""


def _checkpoint_dir(path: pathlib.Path, content: str) -> None:
    path.mkdir()
    (path / "config.json").write_text(content)
    (path / "model.safetensors").write_text(content)


def test_a_replace_killed_between_its_renames_is_repaired_by_the_next_write(tmp_path):
    import subprocess
    import sys

    from mra_jax.atomic import atomic_directory, check_output_dir

    out = tmp_path / "ckpt"
    _checkpoint_dir(out, "old")
    env = {**__import__("os").environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])}
    killed = subprocess.run([sys.executable, "-c", _KILLED_REPLACE, str(out)], env=env, check=False)
    assert killed.returncode == -9
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert "ckpt" not in leftovers and any(n.startswith(".ckpt.old-") for n in leftovers), leftovers
    with pytest.raises(FileExistsError, match="already exists"):  # the next write puts the old one back first
        check_output_dir(out, force=False)
    assert (out / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing left behind
    with atomic_directory(out, force=True) as tmp:  # and an atomic exchange replaces it in one step
        (tmp / "config.json").write_text("new")
        (tmp / "model.safetensors").write_text("new")
    assert (out / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
