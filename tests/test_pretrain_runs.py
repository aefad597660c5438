"""scripts/pretrain.py end to end, in subprocesses on 8 fake CPU devices: the loss falls, a run killed with SIGKILL
resumes to exactly the uninterrupted run's losses, a checkpoint resumed on another mesh continues them, and a
two-process run (jax.distributed over localhost, 4 devices each) logs the same losses as the one-process run."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from filelock import FileLock

pytestmark = pytest.mark.slow  # end to end: pretraining runs in subprocesses

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 30
ARGS = ["configs/pretrain/tiny.yaml", "progress_bar=false", "tensorboard=false", "data.seq_len=64",
        "data.batch_size=8", f"steps={STEPS}", "log_every=1", "eval_every=15", "checkpoint_every=10",
        "mesh.data=8", "mesh.fsdp=1", "optimizer.warmup_steps=3", "optimizer.learning_rate=2e-3"]
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture(scope="module")
def shared(tmp_path_factory, worker_id) -> pathlib.Path:
    """A directory of this test session that every pytest-xdist worker sees (the workers' common temp root)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if worker_id != "master" else root


@pytest.fixture(scope="module")
def env(shared):
    """The runs' environment for a number of CPU devices. One JAX compilation cache for all of them: the killed and
    the resumed run reuse the reference run's programs (a run is mostly compiling; the cache changes no program)."""
    def make(devices: int) -> dict[str, str]:
        return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_XLA}",
                "PYTHONPATH": str(ROOT), "JAX_COMPILATION_CACHE_DIR": str(shared / "pretrain_runs_jax_cache")}

    return make


def _command(out: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "pretrain.py"), *ARGS, f"output_dir={out}", *extra]


def _records(out: pathlib.Path, partial_last_line: bool = False) -> list[dict]:
    """The logged records; ``partial_last_line``: a killed writer may have left its last line cut."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    if partial_last_line and lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines = lines[:-1]
    return [json.loads(line) for line in lines]


def _losses(out: pathlib.Path, partial_last_line: bool = False) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(out, partial_last_line) if "loss" in r}


@pytest.fixture(scope="module")
def reference(shared, env) -> pathlib.Path:
    """The uninterrupted one-process run, made once per session however the tests are spread over workers."""
    out = shared / "pretrain_reference"
    with FileLock(str(shared / "pretrain_reference.lock")):
        if not (out / "complete").is_file():
            shutil.rmtree(out, ignore_errors=True)
            done = subprocess.run(_command(out), cwd=ROOT, env=env(8), capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
            assert f"checkpoint: {out / 'checkpoints' / str(STEPS)}" in done.stdout
            (out / "complete").touch()
    return out


def test_pretraining_lowers_the_loss_and_leaves_loadable_checkpoints(reference, env, tmp_path):
    losses = _losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    evals = [r for r in _records(reference) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [15, 30]
    assert np.mean([losses[s] for s in range(1, 4)]) - np.mean([losses[s] for s in range(26, 31)]) > 0.5
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    record = _records(reference)[-2]
    assert {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu"} <= set(record)
    assert (reference / "config.yaml").is_file() and (reference / "tokenizer.json").is_file()
    steps = sorted(int(p.name) for p in (reference / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [20, 30]  # keep_checkpoints: 2
    import mra_jax  # the step directory is a model checkpoint

    model = mra_jax.MraForMaskedLM.from_pretrained(reference / "checkpoints" / "30")
    assert model.config.vocab_size <= 1000
    export = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_to_hf.py"), "--checkpoint",
                             str(reference / "checkpoints" / "30"), "--out", str(reference / "hf")], cwd=ROOT,
                            env=env(1), capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    assert (reference / "hf" / "model.safetensors").is_file()
    # The run's tokenizer goes with the export; transformers' AutoTokenizer gives the run's ids.
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(reference / "tokenizer.json"))
    theirs = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(reference / "hf")
    for text in ("The river was their home.", "  two  spaces, <mask> and\nnew lines", "ünïcödé 123"):
        assert theirs(text)["input_ids"] == ours.encode(text).ids, text
    (tmp_path / "rows.jsonl").write_text('{"text": "a row"}\n')
    predict = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"),
                              str(reference / "checkpoints" / "30"), str(tmp_path / "rows.jsonl")], cwd=ROOT,
                             env=env(1), capture_output=True, text=True, timeout=300)
    assert predict.returncode == 1 and predict.stderr.strip().splitlines()[-1] == (
        f"error: {reference / 'checkpoints' / '30'} is a masked-LM checkpoint (a pretraining run's), not a fine-tuned "
        "model (MraForSequenceClassification, MraForTokenClassification, MraForQuestionAnswering, "
        "MraForMultipleChoice); fine-tune it first (scripts/finetune.py) and predict with that run's export or "
        "checkpoint")


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(request, env, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(_command(out), cwd=ROOT, env=env(8), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        # Kill as soon as the second checkpoint is being written (or, failing that, a few steps after it).
        while time.time() < deadline and process.poll() is None:
            checkpoints = out / "checkpoints"
            names = [p.name for p in checkpoints.iterdir()] if checkpoints.is_dir() else []
            metrics = out / "metrics.jsonl"
            logged = max(_losses(out, partial_last_line=True), default=0) if metrics.is_file() else 0
            if any(n.startswith("20.") for n in names) or logged >= 23:
                break
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = max(_losses(out, partial_last_line=True))
    assert killed_at < STEPS
    done = subprocess.run(_command(out), cwd=ROOT, env=env(8), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = request.getfixturevalue("reference")  # only now: another worker may be making it meanwhile
    assert _losses(out) == _losses(reference)  # bitwise: same data, masks and dropout after the resume
    evals = [(r["step"], r["eval_loss"]) for r in _records(out) if "eval_loss" in r]
    assert evals == [(r["step"], r["eval_loss"]) for r in _records(reference) if "eval_loss" in r]
    assert not [p for p in (out / "checkpoints").iterdir() if "tmp" in p.name]


def test_two_processes_log_the_losses_of_one_process(request, env, tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    processes = [subprocess.Popen(
        _command(out, f"distributed.coordinator_address=localhost:{port}", "distributed.num_processes=2",
                 f"distributed.process_id={i}", "distributed.local_device_count=4"),
        cwd=ROOT, env=env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=600) for p in processes]
    for p, (_, err) in zip(processes, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    reference = request.getfixturevalue("reference")
    got, want = _losses(out), _losses(reference)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=2e-5)
    assert sorted(p.name for p in (out / "checkpoints" / "30" / "data").iterdir() if p.suffix == ".json") == [
        "process_0-of-2.json", "process_1-of-2.json"]


def test_resume_on_another_mesh_continues_the_uninterrupted_losses(request, env, tmp_path):
    """The reference run's step-20 checkpoint (mesh.data=8, parameters replicated) resumed on mesh.data=4 mesh.fsdp=2
    (parameters sharded): restored resharded, with the same `steps` (hence learning-rate schedule), it logs the
    uninterrupted run's losses."""
    reference = request.getfixturevalue("reference")
    out = tmp_path / "resharded"
    shutil.copytree(reference, out, ignore=lambda d, names: [n for n in names if n in ("complete", "hf")
                                                             or (d.endswith("checkpoints") and n == str(STEPS))])
    first_config = (out / "config.yaml").read_text()
    done = subprocess.run(_command(out, "mesh.data=4", "mesh.fsdp=2"), cwd=ROOT, env=env(8), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming {out} from step 20 (checkpoint steps: 20)" in done.stdout
    assert re.search(r"^step 30: train loss \d+\.\d{4}, eval loss \d+\.\d{4} \(eval_accuracy", done.stdout, re.M)
    got, want = _losses(out), _losses(reference)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=2e-5)
    (got_eval,), (want_eval,) = ([r["eval_loss"] for r in _records(run) if r["step"] == STEPS and "eval_loss" in r]
                                 for run in (out, reference))
    np.testing.assert_allclose(got_eval, want_eval, rtol=2e-5)
    assert (out / "config.yaml").read_text() == first_config  # each start's config is kept
    assert "mesh:\n  data: 4\n  fsdp: 2" in (out / "config.2.yaml").read_text()


def test_a_tampered_training_checkpoint_is_neither_loaded_nor_exported(reference, env, tmp_path):
    """Step 30 of the reference run with step 20's parameters: `from_pretrained` (export, predict, fine-tuning from
    it) refuses it by the step's recorded checksums; without its checksums it is refused unless allowed."""
    from flax import nnx

    import mra_jax

    steps = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", steps)
    shutil.rmtree(steps / "30" / "params")
    shutil.copytree(steps / "20" / "params", steps / "30" / "params")
    with pytest.raises(ValueError, match=r"checkpoints/30 is corrupted: the content of "):
        mra_jax.MraForMaskedLM.from_pretrained(steps / "30")
    shutil.rmtree(steps / "30" / "checksums")
    export = [sys.executable, str(ROOT / "scripts" / "export_to_hf.py"), "--checkpoint", str(steps / "30"), "--out",
              str(tmp_path / "hf")]
    done = subprocess.run(export, cwd=ROOT, env=env(1), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and not (tmp_path / "hf").exists()
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: training checkpoint {steps / '30'} has no checksums (checksums/metadata is missing), so its content "
        "cannot be verified; pass --allow-unverified (verify=False) to use it anyway")
    done = subprocess.run([*export, "--allow-unverified"], cwd=ROOT, env=env(1), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    intact = mra_jax.MraForMaskedLM.from_pretrained(steps / "20")
    exported = mra_jax.MraForMaskedLM.from_pretrained(tmp_path / "hf")  # step 20's weights, as accepted
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(exported, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(intact, nnx.Param)), strict=True):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


def test_ctrl_c_stops_a_run_in_one_line_and_it_resumes(request, env, tmp_path):
    """SIGINT (Ctrl-C) once the run has a checkpoint, or during compilation: exit 130 and one line, no traceback;
    the checkpoints written are complete and the run resumes from the last."""
    out = tmp_path / "run"
    for wait_for_checkpoint in (False, True):
        process = subprocess.Popen(_command(out), cwd=ROOT, env=env(8), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while time.time() < deadline and process.poll() is None:
            if (out / "checkpoints" / "10").is_dir() if wait_for_checkpoint else (out / "model_config.json").is_file():
                break
            time.sleep(0.05)
        time.sleep(0 if wait_for_checkpoint else 0.5)  # (then the step's compilation runs for seconds)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=300)
        assert process.returncode == 130, err[-3000:]
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("W", "I"))]
        assert lines[-1] == "interrupted: the last complete checkpoint is kept" and "Traceback" not in err, err[-3000:]
    done = subprocess.run(_command(out), cwd=ROOT, env=env(8), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"resuming .* from step (10|20) ", done.stdout), done.stdout
