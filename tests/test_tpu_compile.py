"""The TPU kernels compile with libtpu's own compiler for a real TPU target, on this CPU machine (deviceless AOT:
``jax.experimental.topologies``, as MaxText's ``train_compile.py`` checks a pod configuration without a TPU).

Runs in a subprocess that sees libtpu (``scripts/install_libtpu.py`` puts it in ``.libtpu``, or set
``MRA_JAX_LIBTPU_PATH``); skipped, saying so, only when libtpu is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # libtpu's compiler

ROOT = pathlib.Path(__file__).resolve().parents[1]

WORKER = r"""
import json, re, sys
import jax, jax.numpy as jnp
from jax.experimental.topologies import get_topology_desc
from jax.sharding import SingleDeviceSharding
from mra_jax import mra_attention

dev = get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                        chips_per_host_bounds=(2, 2, 1), num_slices=1).devices[0]
sharding = SingleDeviceSharding(dev)
x = jax.ShapeDtypeStruct((1, 2048, 2, 64), jnp.bfloat16, sharding=sharding)
mask = jax.ShapeDtypeStruct((1, 2048), jnp.int32, sharding=sharding)

def fwd(q, k, v, m):
    return mra_attention(q, k, v, m, num_blocks=512, implementation="pallas_tpu", platform="tpu")

def grad(q, k, v, m):
    return jax.grad(lambda q, k, v: fwd(q, k, v, m).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

out = {"kind": dev.device_kind}
for name, fn in (("fwd", fwd), ("grad", grad)):
    lowered = jax.jit(fn).lower(x, x, x, mask)
    text = lowered.as_text()
    compiled = lowered.compile()
    out[name] = {"calls": len(re.findall(r"custom_call @tpu_custom_call\b", text)),
                 "kernels": sorted(set(re.findall(r'kernel_name = "([^"]*)"', text))),
                 "temp": compiled.memory_analysis().temp_size_in_bytes}
print("RESULT " + json.dumps(out))
"""


def _libtpu_path() -> str:
    where = os.environ.get("MRA_JAX_LIBTPU_PATH", str(ROOT / ".libtpu"))
    if (pathlib.Path(where) / "libtpu").is_dir():
        return where
    if importlib.util.find_spec("libtpu") is not None:
        return ""
    message = f"libtpu is not installed (python scripts/install_libtpu.py puts it in {ROOT / '.libtpu'})"
    if os.environ.get("CI"):  # CI installs it: a missing libtpu there is a failure, not a skip
        pytest.fail(message)
    pytest.skip(message)


def test_tpu_kernels_compile_for_a_tpu_v5e_without_a_tpu():
    path = _libtpu_path()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), path, os.environ.get("PYTHONPATH", "")) if p)}
    env.pop("XLA_FLAGS", None)
    run = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, timeout=900,
                         check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.split("RESULT ", 1)[1])
    assert "v5" in result["kind"].lower()
    assert result["fwd"]["calls"] == 1 and result["fwd"]["kernels"] == ["block_sparse_attention_tpu_fwd"]
    assert result["grad"]["calls"] == 3
    assert result["grad"]["kernels"] == [f"block_sparse_attention_tpu_{k}" for k in ("dkv", "dq", "fwd")]
