"""Starting a run on an output_dir that holds one (`mra_jax.training.rundir`): only safe keys may change on resume,
``steps`` must lie above the latest checkpoint, every start's config is kept, ``--overwrite`` moves the old run aside,
and a refused start writes nothing. Also the loop's console output and progress bar."""

from __future__ import annotations

import importlib.util
import io
import os
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mra_jax.training import loop, pretrain, rundir
from mra_jax.training.config import PretrainConfig, load_config, to_yaml
from mra_jax.training.metrics import MetricsWriter

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "pretrain" / "tiny.yaml")


def _config(out: pathlib.Path, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, TINY, [f"output_dir={out}", "progress_bar=false", *overrides])


def fake_run(out: pathlib.Path, cfg, steps: tuple[int, ...] = (10, 20)) -> pathlib.Path:
    """A run directory as a first start leaves it: its config.yaml and (tiny) Orbax checkpoints at ``steps``."""
    rundir.record_config(out, to_yaml(cfg))
    with ocp.CheckpointManager(out / "checkpoints") as manager:
        for step in steps:
            manager.save(step, args=ocp.args.Composite(x=ocp.args.StandardSave({"x": np.ones(2)})))
        manager.wait_until_finished()
    return out


def snapshot(root: pathlib.Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (``root``'s siblings included) with its mtime and size; the run's lock file beside
    it (taken by every start, refused or not; a lock is the open file, not its presence) is left out."""
    return {str(p.relative_to(root.parent)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.parent.rglob("*") if p.name != f".{root.name}.lock"}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("recorded") / "run"
    return fake_run(out, _config(out))


@pytest.fixture
def run_dir(recorded, tmp_path) -> pathlib.Path:
    """A copy of the recorded run that a test may change."""
    return pathlib.Path(shutil.copytree(recorded, tmp_path / "run"))


def test_resume_allows_safe_changes_and_says_from_which_step(recorded, capsys):
    before = snapshot(recorded)
    safe = ["steps=40", "log_every=5", "eval_every=7", "checkpoint_every=5", "keep_checkpoints=4", "tensorboard=false",
            "mesh.data=4", "mesh.fsdp=2", "mesh.rules=dp", "distributed.local_device_count=8", "data.num_threads=0",
            "data.eval_batches=5", "attention=dense", "remat=full", "scan_layers=false"]
    started = rundir.start(_config(recorded, *safe), recorded)
    assert started.latest_step == 20 and started.checkpoint_steps == (10, 20)
    assert f"resuming {recorded} from step 20 (checkpoint steps: 10, 20)" in capsys.readouterr().out
    assert snapshot(recorded) == before


def test_resume_refuses_every_changed_key_in_one_line_and_writes_nothing(recorded):
    before = snapshot(recorded)
    changed = ["model=configs/models/mra-small.json", "seed=1", "dtype=bfloat16", "mlm_probability=0.2",
               "data.batch_size=32", "data.seq_len=256", "data.prepared=store", "data.tokenizer=tok.json",
               "optimizer.learning_rate=5e-4", "steps=40"]
    with pytest.raises(ValueError) as info:
        rundir.start(_config(recorded, *changed), recorded)
    message = str(info.value)
    assert "\n" not in message and "config.yaml" in message and "--overwrite" in message
    for change in ["model 'configs/models/mra-tiny.json' -> 'configs/models/mra-small.json'", "seed 0 -> 1",
                   "dtype 'float32' -> 'bfloat16'", "mlm_probability 0.15 -> 0.2", "data.batch_size 16 -> 32",
                   "data.seq_len 128 -> 256", "data.prepared None -> 'store'", "data.tokenizer None -> 'tok.json'",
                   "optimizer.learning_rate 0.001 -> 0.0005"]:
        assert change in message
    assert not re.search(r"[:;] steps ", message)  # steps may change
    assert snapshot(recorded) == before


def test_steps_at_or_below_the_latest_checkpoint_are_refused(recorded):
    before = snapshot(recorded)
    for steps in (20, 5):
        with pytest.raises(ValueError, match=rf"^steps={steps} is not above the latest checkpoint of .*\(checkpoint "
                                             r"steps: 10, 20\); pass steps > 20"):
            rundir.start(_config(recorded, f"steps={steps}"), recorded)
    assert snapshot(recorded) == before


def test_each_start_keeps_its_config_and_the_latest_is_compared(run_dir):
    first = (run_dir / "config.yaml").read_bytes()
    assert rundir.record_config(run_dir, to_yaml(_config(run_dir, "steps=40"))).name == "config.2.yaml"
    assert rundir.record_config(run_dir, to_yaml(_config(run_dir, "steps=60"))).name == "config.3.yaml"
    assert (run_dir / "config.yaml").read_bytes() == first
    assert [p.name for p in rundir.recorded_configs(run_dir)] == ["config.yaml", "config.2.yaml", "config.3.yaml"]
    # A latest start of an older version recorded seed 1 and no mlm_probability: keys it lacks are not compared.
    text = to_yaml(_config(run_dir, "seed=1")).replace("mlm_probability: 0.15\n", "")
    (run_dir / "config.4.yaml").write_text(text)
    assert rundir.start(_config(run_dir, "seed=1", "mlm_probability=0.3", "steps=80"), run_dir).latest_step == 20
    with pytest.raises(ValueError, match=r"config \(config\.4\.yaml\) differs .*: seed 1 -> 0;"):
        rundir.start(_config(run_dir, "steps=80"), run_dir)


def test_overwrite_moves_the_old_run_aside(run_dir, capsys):
    before = {k.split("/", 1)[1]: v for k, v in snapshot(run_dir).items() if "/" in k}
    started = rundir.start(_config(run_dir, "seed=5", "steps=3"), run_dir, overwrite=True)
    assert not run_dir.exists() and started.latest_step is None
    assert re.fullmatch(r"run\.old-\d{8}T\d{6}Z", started.moved_to.name) and started.moved_to.parent == run_dir.parent
    assert f"moved the earlier run {run_dir} aside to {started.moved_to}" in capsys.readouterr().out
    moved = {k.split("/", 1)[1]: v for k, v in snapshot(started.moved_to).items() if "/" in k and k.startswith("run.")}
    assert moved == before  # renamed, nothing deleted or changed
    started.lock.close()  # (the end of that run)
    again = rundir.start(_config(run_dir), run_dir, overwrite=True)  # nothing to move: a fresh start
    assert again.moved_to is None and not run_dir.exists()


def test_pretraining_refuses_a_changed_resume_before_writing_anything(run_dir):
    before = snapshot(run_dir)
    with pytest.raises(ValueError, match=r"cannot change on resume: data\.batch_size 16 -> 32; use another"):
        pretrain.run(_config(run_dir, "data.batch_size=32", "steps=40"))
    with pytest.raises(ValueError, match=r"steps=20 is not above the latest checkpoint"):
        pretrain.run(_config(run_dir, "steps=20"))
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_scripts_pass_overwrite_to_run(script, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(f"script_{script}", ROOT / "scripts" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []

    def fake_run(cfg, *, overwrite=False, allow_unverified=False):
        calls.append(overwrite)
        raise ValueError("refused")

    monkeypatch.setattr(module, "run", fake_run)
    config = TINY if script == "pretrain" else str(ROOT / "configs" / "finetune" / "majority-tiny.yaml")
    assert module.main([config, "--overwrite", "steps=5"]) == 1
    assert module.main([config, "steps=5"]) == 1
    assert calls == [True, False] and "error: refused" in capsys.readouterr().err


def test_loop_prints_compile_time_and_evals_and_its_bar_counts_completed_steps(tmp_path, monkeypatch, capsys):
    """The bar never counts the step just dispatched, except at host syncs (log, eval, save), and starts after
    the first step."""
    dispatched, seen = [], []

    class Bar(loop.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})
            seen.append(("open", self.n, dispatched[-1]))

        def update(self, n=1):
            super().update(n)
            seen.append(("update", self.n, dispatched[-1]))

    monkeypatch.setattr(loop, "tqdm", Bar)

    def train_step(state, batch):
        dispatched.append(state + 1)
        metrics = {"loss": jnp.float32(2.0 / (state + 1)), "learning_rate": jnp.float32(1e-3),
                   "grad_norm": jnp.float32(1.0), "finite": jnp.bool_(True)}
        return state + 1, metrics

    sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), PartitionSpec("data"))
    batches = iter(lambda: {"x": np.zeros((jax.device_count(), 2), np.float32)}, None)
    writer = MetricsWriter(tmp_path, tensorboard=False)
    state, result = loop.train_loop(
        2, train_step, batches, sharding, loop.Schedule(steps=12, log_every=4, eval_every=8, checkpoint_every=100),
        start=2, writer=writer, save=lambda s, r: None, evaluate=lambda s, step: {"step": step, "eval_loss": 0.5,
                                                                                   "eval_accuracy": 0.75},
        tokens_per_step=16, flops_per_token=None, peak_flops=None, description="test")
    out = capsys.readouterr().out
    assert state == 12 and result["eval"]["step"] == 12
    assert re.search(r"^test: step 3 took \d+\.\d s \(compilation included\)$", out, re.M)
    assert "step 8: train loss 0.2500, eval loss 0.5000 (eval_accuracy 0.75)" in out
    assert "step 12: train loss 0.1667, eval loss 0.5000" in out
    assert seen[0] == ("open", 3, 3)  # opened once step 3, the first, is complete
    for kind, n, step in seen[1:]:  # n: the bar's count once step `step` was dispatched
        synced = step % 4 == 0  # log and eval steps (12 the last) fetch their metrics
        assert n == step - 1 or (synced and n == step), (kind, n, step)
    assert [n for kind, n, _ in seen if kind == "update"][-1] == 12


def test_a_second_run_on_the_same_directory_is_refused_naming_the_first(tmp_path):
    first = rundir.start(_config(tmp_path / "run"), tmp_path / "run")
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'run'))} is in use by another run \(pid "
                                         rf"{os.getpid()} on .*\)"):
        rundir.start(_config(tmp_path / "run"), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # the lock file lives beside the run
    first.lock.close()  # (the end of the first run)
    rundir.start(_config(tmp_path / "run"), tmp_path / "run").lock.close()

    @rundir.releases_locks
    def failing_run():
        rundir.start(_config(tmp_path / "run"), tmp_path / "run")
        raise RuntimeError("the run fails")

    with pytest.raises(RuntimeError):
        failing_run()
    rundir.start(_config(tmp_path / "run"), tmp_path / "run").lock.close()  # released by the failed run


def test_a_directory_of_another_kind_or_of_no_run_or_whose_checkpoints_are_gone_is_refused(run_dir, tmp_path):
    """Fine-tuning into a pretraining run, a run into a user's directory, and a run whose results remain but whose
    checkpoints were removed: each refused in one line, nothing written."""
    from mra_jax.training.finetune import FinetuneConfig

    before = snapshot(run_dir)
    finetune = load_config(FinetuneConfig, None, [f"output_dir={run_dir}", "model=m", "steps=100"])
    with pytest.raises(ValueError, match=rf"^{run_dir} holds a pretraining run; a fine-tuning run needs its own "
                                         r"output_dir$"):
        rundir.start(finetune, run_dir)
    assert snapshot(run_dir) == before

    user = tmp_path / "my-data"
    user.mkdir()
    (user / "config.yaml").write_text("learning: fast\n")  # a user's file, not a run's config
    other = tmp_path / "my-other-data"
    other.mkdir()
    (other / "data.jsonl").write_text("{}\n")
    for directory in (user, other):
        before = snapshot(directory)
        with pytest.raises(ValueError, match=rf"^{directory} is not empty and holds no run of mra-jax"):
            rundir.start(_config(directory), directory)
        assert snapshot(directory) == before

    finished = tmp_path / "finished"
    rundir.record_config(finished, to_yaml(_config(finished)))
    (finished / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (finished / "hf").mkdir()
    before = snapshot(finished)
    with pytest.raises(ValueError, match=r"holds a run with results \(metrics.jsonl, hf/\) but no checkpoint to resume "
                                         r"from: starting again would replace them; use another output_dir, or "
                                         r"--overwrite"):
        rundir.start(_config(finished), finished)
    assert snapshot(finished) == before
