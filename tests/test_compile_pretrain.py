"""The ahead-of-time compile of the MLM train step (`mra_jax.training.aot`), on 8 fake CPU devices (no libtpu)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import pytest

from mra_jax.training import aot
from mra_jax.training.config import PretrainConfig, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the config's relative paths

@pytest.mark.slow

def test_compile_train_step_on_cpu_devices(tmp_path):
    devices = jax.devices("cpu")
    if len(devices) < 8:
        pytest.skip("needs 8 CPU devices (tests/conftest.py sets XLA_FLAGS)")
    # The tiny recipe with mra-tiny.json cut to one layer and shorter sequences, to keep XLA:CPU's compile short;
    # fsdp so that parameters are gathered.
    model = json.loads((ROOT / "configs/models/mra-tiny.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**model, "num_hidden_layers": 1}))
    cfg = load_config(PretrainConfig, "configs/pretrain/tiny.yaml",
                      [f"model={tmp_path / 'config.json'}", "data.seq_len=32", "data.batch_size=8", "mesh.data=2",
                       "mesh.fsdp=4"])
    report = aot.compile_train_step(cfg, devices[:8], hbm_bytes=2**30)
    mem = report["memory_per_device"]
    for key in ("argument", "output", "temp", "total"):
        assert mem[key] > 0, (key, mem)
    assert mem["total"] >= mem["argument"] + mem["temp"] - mem["alias"]
    assert report["fits"] is True and report["hbm_bytes"] == 2**30
    assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert report["vocab_size"] == 99  # configs/models/mra-tiny.json's, no tokenizer needed
    assert set(report["collectives"]) == set(aot.COLLECTIVES)
    assert all(isinstance(n, int) and n >= 0 for n in report["collectives"].values())
    assert report["collectives"]["all-gather"] > 0  # fsdp: parameters are gathered
    assert report["tpu_custom_calls"] == 0 and report["platform"] == "cpu"
    assert report["compile_s"] >= 0
    assert "memory per device" in aot.format_report(report)


def test_count_collectives():
    # XLA:TPU's forms: an async collective in its start, done and overlapped fusions; a reduce-scatter fusion.
    text = """
%all-reduce-scatter.3 (input: bf16[768,768]) -> bf16[192,768] {
  %all-reduce.7 = bf16[768,768]{1,0} all-reduce(bf16[768,768]{1,0} %input), channel_id=9, to_apply=%add
  ROOT %ds = bf16[192,768]{1,0} dynamic-slice(%all-reduce.7, %i, %j), dynamic_slice_sizes={192,768}
}

%fused_computation.1 (param_0: f32[4]) -> (f32[4], f32[8]) {
  %all-gather.4 = f32[8]{0} all-gather(f32[4]{0} %param_0), channel_id=4, dimensions={0}
  ROOT %t = (f32[4]{0}, f32[8]{0}) tuple(%param_0, %all-gather.4)
}

%fused_computation.2 (param_0.1: f32[4], param_1: f32[8]) -> f32[8] {
  ROOT %all-gather.5 = f32[8]{0} all-gather(f32[4]{0} %param_0.1), channel_id=4, dimensions={0}
}

%async_collective_fusion.7 (param_0.2: f32[4]) -> f32[8] {
  ROOT %all-gather.6 = f32[8]{0} all-gather(f32[4]{0} %param_0.2), channel_id=4, dimensions={0}
}

ENTRY %main (p: f32[8]) -> f32[8] {
  %async-collective-start.1 = (f32[4]{0}, f32[8]{0}) fusion(%x), kind=kCustom, calls=%fused_computation.1
  %fusion.7 = f32[8]{0} fusion(%x), kind=kOutput, calls=%async_collective_fusion.7
  %async-collective-done.1 = f32[8]{0} fusion(%gte0, %gte1), kind=kCustom, calls=%fused_computation.2
  %fusion.3 = bf16[192,768]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.3
  %all-reduce.1 = f32[8]{0} all-reduce(f32[8]{0} %p), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %ags = (f32[4]{0}, f32[8]{0}) all-gather-start(f32[4]{0} %x), channel_id=2, dimensions={0}
  %agd = f32[8]{0} all-gather-done((f32[4]{0}, f32[8]{0}) %ags)
  %rs = f32[2]{0} reduce-scatter(f32[8]{0} %all-reduce.1), dimensions={0}, to_apply=%add
  %cp = f32[8]{0} collective-permute-start(f32[8]{0} %y), source_target_pairs={{0,1}}
  %cp.2 = f32[8]{0} collective-permute(f32[8]{0} %y), source_target_pairs={{1,0}}
  %a2a = f32[8]{0} all-to-all(f32[8]{0} %y), dimensions={0}
}
"""
    assert aot.count_collectives(text) == {"all-reduce": 1, "all-gather": 2, "reduce-scatter": 2, "all-to-all": 1,
                                           "collective-permute": 2}


@pytest.mark.parametrize("topology", ["v9:4x4", "v5e", "tpu:2x2", "v5e:4", "v5e:4xq", "v5e:0x4", "v5p:2x2x2x2"])
def test_unknown_topology_is_a_value_error(topology):
    with pytest.raises(ValueError, match="topology"):
        aot.parse_topology(topology)
    cfg = load_config(PretrainConfig, "configs/pretrain/tiny.yaml")
    with pytest.raises(ValueError, match="topology"):
        aot.compile_for_topology(cfg, topology)


def test_parse_topology():
    assert aot.parse_topology("v5e:4x4") == ("v5e", "v5e:4x4", "default", 16)
    assert aot.parse_topology("v5p:2x2x4") == ("v5p", "v5:2x2x4", "megacore", 16)
    assert aot.parse_topology("v4:2x2x1") == ("v4", "v4:2x2x1", "megacore", 4)
    assert aot.parse_topology("v6e:4x4") == ("v6e", "v6e:4x4", "default", 16)


def test_cli_errors(monkeypatch, capsys):
    # The script sets these (setdefault) when imported; set here, they are restored after the test.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    spec = importlib.util.spec_from_file_location("compile_pretrain", ROOT / "scripts" / "compile_pretrain.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["configs/pretrain/tiny.yaml", "--topology", "v9:4x4"]) == 1
    assert "error: unknown TPU topology 'v9:4x4'" in capsys.readouterr().err
    assert cli.main(["configs/pretrain/tiny.yaml", "--topology", "v5e:2x2", "remat=half"]) == 1
    assert "error: invalid pretraining config: remat" in capsys.readouterr().err
    assert cli.main(["configs/pretrain/tiny.yaml", "--topology", "v5e:2x2", "no_such_key=1"]) == 1
    assert "error: invalid configuration" in capsys.readouterr().err
