"""Ahead-of-time compile of the MLM train step for a mesh of devices that need not exist: "will it fit on the pod?".

`compile_for_topology(cfg, "v5e:4x4")` compiles the configured train step with libtpu's compiler for a TPU slice
described by `jax.experimental.topologies.get_topology_desc` (as MaxText's ``train_compile.py``), on a machine with
no TPU: run it with ``JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1`` in an environment that has ``jax[tpu]``
(libtpu). `compile_train_step(cfg, devices)` does the same for any list of devices (e.g. fake CPU devices in tests).

Nothing is allocated and no data is read: the state and the batch are abstract (`jax.ShapeDtypeStruct` with their
shardings). The report gives XLA's per-device memory (``compiled.memory_analysis()``), the collectives of the
compiled HLO by kind, and the Mosaic kernels (``tpu_custom_call``) of the lowered module.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mra_jax.configuration import MraConfig
from mra_jax.sharding import RULES, make_mesh
from mra_jax.training import data as data_lib
from mra_jax.training import store
from mra_jax.training.config import PretrainConfig
from mra_jax.training.pretrain import build_pretraining, model_config_for, validate

GiB = 2**30

# Chip name of a topology string -> (get_topology_desc's topology prefix, chip_config_name, HBM bytes per chip).
CHIPS: dict[str, tuple[str, str, int]] = {
    "v4": ("v4", "megacore", 32 * GiB),
    "v5e": ("v5e", "default", 16 * GiB),
    "v5p": ("v5", "megacore", 95 * GiB),
    "v6e": ("v6e", "default", 32 * GiB),
}
CHIPS_PER_HOST_BOUNDS = (2, 2, 1)  # as MaxText's train_compile.py; it only assigns chips to (fake) hosts

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# An HLO instruction `%name = shape op(...)`, or its async form `op-start(...)` (the `-done` is not counted again).
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_COMPUTATION_RE = re.compile(r"^(?:ENTRY\s+)?%?([\w.-]+)\s+\(.*\)\s*->.*\{\s*$")
_CALL_RE = re.compile(r"^\s*(?:ROOT\s+)?%([\w.-]+)\s*=.*\bcalls=%([\w.-]+)")
# XLA:TPU's refusal of a program over HBM (not Mosaic's VMEM/SMEM errors: those are kernel compile failures).
_OOM_RE = re.compile(r"(?i)out of memory (?:in memory space |on )hbm")
_TPU_CUSTOM_CALL_RE = re.compile(r"custom_call @tpu_custom_call\b|custom_call_target=\"tpu_custom_call\"")


def parse_topology(topology: str) -> tuple[str, str, str, int]:
    """``"v5e:4x4"`` -> (chip, get_topology_desc's topology_name, chip_config_name, number of chips)."""
    chip, sep, dims = topology.partition(":")
    if not sep or chip not in CHIPS:
        raise ValueError(f"unknown TPU topology {topology!r}: expected CHIP:AxB[xC] with CHIP one of "
                         f"{sorted(CHIPS)}, e.g. v5e:4x4, v5p:2x2x4, v4:2x2x1")
    try:
        sizes = [int(d) for d in dims.split("x")]
    except ValueError:
        sizes = []
    if not 2 <= len(sizes) <= 3 or min(sizes) < 1:
        raise ValueError(f"bad dimensions {dims!r} in the TPU topology {topology!r}: expected AxB or AxBxC, e.g. "
                         "4x4 or 2x2x4")
    prefix, chip_config, _ = CHIPS[chip]
    return chip, f"{prefix}:{dims}", chip_config, math.prod(sizes)


def topology_devices(topology: str) -> list[jax.Device]:
    """The devices of a TPU slice description (libtpu needed; no TPU needed)."""
    from jax.experimental.topologies import get_topology_desc

    _, name, chip_config, chips = parse_topology(topology)
    try:
        desc = get_topology_desc(platform="tpu", topology_name=name, chip_config_name=chip_config,
                                 chips_per_host_bounds=CHIPS_PER_HOST_BOUNDS, num_slices=1)
    except Exception as e:  # no libtpu, or a topology libtpu refuses
        raise ValueError(f"cannot describe the TPU topology {topology!r} ({name}, {chip_config}; libtpu comes with "
                         f"`pip install 'jax[tpu]=={jax.__version__}'`): {type(e).__name__}: {e}") from e
    devices = list(desc.devices)
    if len(devices) != chips:
        raise ValueError(f"the TPU topology {topology!r} has {len(devices)} devices, expected {chips}")
    return devices


def _mesh(cfg: PretrainConfig, devices: Sequence[jax.Device]):
    """As `runtime.build_mesh`, over ``devices`` instead of ``jax.devices()``."""
    m = cfg.mesh
    if m.rules not in RULES:
        raise ValueError(f"mesh.rules must be one of {sorted(RULES)}, got {m.rules!r}")
    sizes = {"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor}
    if bad := {k: v for k, v in sizes.items() if v == 0 or v < -1}:
        raise ValueError(f"mesh sizes must be positive or -1, got {bad}")
    try:
        return make_mesh(m.data, m.fsdp, m.tensor, devices=devices)
    except ValueError as e:
        raise ValueError(f"mesh {sizes}: {e}") from e


def _special_and_config(cfg: PretrainConfig) -> tuple[data_lib.SpecialTokens, MraConfig, str]:
    """Special ids, the model config (as training would build it) and where the vocabulary size came from.

    With ``data.prepared`` (a token store) or ``data.tokenizer`` (an existing file), that tokenizer sizes the
    vocabulary as in training; otherwise the model config's ``vocab_size`` and special ids are used as they are
    (``<mask>`` = the last id, as RoBERTa's).
    """
    if cfg.data.prepared and store.is_store(cfg.data.prepared):
        special = data_lib.special_tokens(store.TokenStore(cfg.data.prepared).tokenizer())
        source = f"the token store {cfg.data.prepared}"
    elif cfg.data.tokenizer and os.path.isfile(cfg.data.tokenizer):
        special = data_lib.special_tokens(data_lib.load_tokenizer(cfg.data.tokenizer))
        source = f"tokenizer {cfg.data.tokenizer}"
    else:
        base = MraConfig.from_pretrained(cfg.model)
        ids = (base.bos_token_id, base.eos_token_id, base.pad_token_id)
        if any(i is None or not 0 <= i < base.vocab_size - 1 for i in ids):
            raise ValueError(f"{cfg.model}: bos/eos/pad ids {base.bos_token_id}/{base.eos_token_id}/"
                             f"{base.pad_token_id} must lie below the last id of the {base.vocab_size}-word vocabulary "
                             "(which stands for <mask>); set data.tokenizer")
        special = data_lib.SpecialTokens(cls_id=base.bos_token_id, sep_id=base.eos_token_id,
                                         pad_id=base.pad_token_id, mask_id=base.vocab_size - 1,
                                         vocab_size=base.vocab_size)
        source = f"model config {cfg.model}"
        if cfg.data.tokenizer:
            source += f"; data.tokenizer {cfg.data.tokenizer} not found"
    config, _ = model_config_for(cfg, special, source)
    return special, config, source


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective operations of a compiled HLO module's text, by kind (an async ``-start``/``-done`` pair once).

    XLA:TPU's own forms are read as what they do: an async collective appears three times (in the fusions of
    ``async-collective-start``, of ``async-collective-done`` and of the computation it overlaps with, named
    ``async_collective_fusion``), counted once at its start; a reduce-scatter is an all-reduce inside an
    ``all-reduce-scatter`` fusion. Collectives combined by XLA into one (tuple) operation count once.
    """
    lines = hlo_text.splitlines()
    done_fusions = set()  # computations called by async-collective-done: copies of the start's collective
    for line in lines:
        if (call := _CALL_RE.match(line)) and call.group(1).startswith("async-collective-done"):
            done_fusions.add(call.group(2))
    counts = dict.fromkeys(COLLECTIVES, 0)
    computation = ""
    for line in lines:
        if header := _COMPUTATION_RE.match(line):
            computation = header.group(1)
            continue
        op = _COLLECTIVE_RE.search(line)
        if not op or computation in done_fusions or computation.startswith("async_collective_fusion"):
            continue
        kind = op.group(1)
        if kind == "all-reduce" and computation.startswith("all-reduce-scatter"):
            kind = "reduce-scatter"
        counts[kind] += 1
    return counts


def compile_train_step(cfg: PretrainConfig, devices: Sequence[jax.Device], *, hbm_bytes: int | None = None,
                       target: str | None = None, hlo_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Lower and compile the configured MLM train step for a mesh over ``devices`` (abstract inputs only).

    The attention kernels are chosen for ``devices[0].platform`` (`RuntimeOptions.platform`), not for the default
    backend. ``hbm_bytes``: the device memory to compare the total with; ``hlo_path``: write the compiled HLO text
    there. Returns the report (see `format_report`).
    """
    t_start = time.perf_counter()
    validate(cfg, data=False)
    devices = list(devices)
    platform = devices[0].platform
    special, config, vocab_source = _special_and_config(cfg)
    mesh = _mesh(cfg, devices)
    job = build_pretraining(cfg, config, mesh, special, platform=platform)
    abstract, shardings, batch_sharding, train_step = job.abstract, job.shardings, job.batch_sharding, job.train_step
    state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    batch_in = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding)
                for k in ("input_ids", "attention_mask")}
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))

    t0 = time.perf_counter()
    lowered = train_step.lower(state_in, batch_in)
    lower_s = time.perf_counter() - t0
    custom_calls = len(_TPU_CUSTOM_CALL_RE.findall(lowered.as_text()))
    t0 = time.perf_counter()
    compiled, oom = None, None
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA:TPU refuses a program over the device memory at compile time: it does not fit
        if not _OOM_RE.search(str(e)):
            raise
        oom = f"{type(e).__name__}: {e}"
    compile_s = time.perf_counter() - t0

    memory, collectives = None, None
    if compiled is not None:
        hlo = compiled.as_text()
        if hlo_path is not None:
            with open(hlo_path, "w") as f:
                f.write(hlo)
        collectives = count_collectives(hlo)
        mem = compiled.memory_analysis()
        memory = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
                  for k in ("argument", "output", "alias", "temp", "generated_code")}
        memory["total"] = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
                           + memory["generated_code"])
        memory["xla_peak"] = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)  # as reported; not printed
    fits = False if oom else None if hbm_bytes is None else memory["total"] <= hbm_bytes
    report = {
        "target": target or f"{len(devices)} {platform} devices",
        "device_kind": devices[0].device_kind,
        "platform": platform,
        "num_devices": len(devices),
        "mesh": dict(mesh.shape),
        "rules": cfg.mesh.rules,
        "model": cfg.model,
        "num_params": num_params,
        "vocab_size": config.vocab_size,
        "vocab_source": vocab_source,
        "attention": cfg.attention,
        "remat": cfg.remat,
        "dtype": cfg.dtype,
        "batch_size": cfg.data.batch_size,
        "seq_len": cfg.data.seq_len,
        "grad_accum_steps": cfg.optimizer.grad_accum_steps,
        "memory_per_device": memory,
        "hbm_bytes": hbm_bytes,
        "fits": fits,
        "out_of_memory": oom,
        "collectives": collectives,
        "tpu_custom_calls": custom_calls,
        "lower_s": round(lower_s, 1),
        "compile_s": round(compile_s, 1),
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    return report


def compile_for_topology(cfg: PretrainConfig, topology: str, *, verbose: bool = True,
                         hlo_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Compile the configured train step for a TPU slice, e.g. ``"v5e:4x4"``, ``"v5p:2x2x4"``, ``"v4:2x2x1"``,
    ``"v6e:4x4"`` (chips = the product of the dimensions); print the report if ``verbose``, and return it.
    Needs libtpu (``jax[tpu]``), no TPU: run with ``JAX_PLATFORMS=cpu`` (and ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` on a
    TPU VM). `ValueError` for an unknown topology, a config that does not fit the mesh, or one training would refuse."""
    chip = parse_topology(topology)[0]
    validate(cfg, data=False)  # a bad config before libtpu's start (the corpus need not be on this machine)
    report = compile_train_step(cfg, topology_devices(topology), hbm_bytes=CHIPS[chip][2], target=topology,
                                hlo_path=hlo_path)
    if report["tpu_custom_calls"] == 0 and cfg.attention in (None, "pallas"):
        report["warning"] = ("no tpu_custom_call in the lowered module: the MRA attention was not lowered to the "
                             "TPU Pallas kernels")
    if verbose:
        print(format_report(report), flush=True)
    return report


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_report(r: dict[str, Any]) -> str:
    """The report as readable text."""
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"target       {r['target']} ({r['num_devices']} x {r['device_kind']}), mesh {mesh}, rules {r['rules']}",
        f"model        {r['model']}: {r['num_params'] / 1e6:.1f}M parameters, vocabulary {r['vocab_size']} "
        f"(from the {r['vocab_source']})",
        f"step         batch {r['batch_size']} x seq {r['seq_len']}, grad_accum {r['grad_accum_steps']}, "
        f"dtype {r['dtype']}, attention {r['attention'] or 'default'}, remat {r['remat']}",
    ]
    if (mem := r["memory_per_device"]) is not None:
        lines += [
            "memory per device:",
            f"  arguments      {_bytes(mem['argument']):>12}",
            f"  outputs        {_bytes(mem['output']):>12}   (aliased with arguments: {_bytes(mem['alias'])})",
            f"  temporaries    {_bytes(mem['temp']):>12}",
            f"  generated code {_bytes(mem['generated_code']):>12}",
            f"  total          {_bytes(mem['total']):>12}   (arguments + outputs - aliased + temporaries + code)",
        ]
        if r["hbm_bytes"] is not None:
            lines.append(f"  HBM            {_bytes(r['hbm_bytes']):>12}   fits: {'yes' if r['fits'] else 'NO'} "
                         f"({100 * mem['total'] / r['hbm_bytes']:.0f}% of HBM)")
        coll = ", ".join(f"{k} {v}" for k, v in r["collectives"].items())
        lines.append(f"collectives  {coll} (operations in the compiled HLO)")
    else:
        first = next((ln.strip() for ln in r["out_of_memory"].splitlines() if ln.strip()), "?")
        lines += [f"memory       fits: NO - the compiler ran out of device memory ({_bytes(r['hbm_bytes'])} HBM):",
                  f"  {first[:600]}"]
    lines += [f"kernels      {r['tpu_custom_calls']} tpu_custom_call (Mosaic) in the lowered module",
              f"time         lower {r['lower_s']} s, compile {r['compile_s']} s, total {r['total_s']} s"]
    if r.get("warning"):
        lines.append(f"WARNING      {r['warning']}")
    return "\n".join(lines)


__all__ = ["CHIPS", "COLLECTIVES", "compile_for_topology", "compile_train_step", "count_collectives",
           "format_report", "parse_topology", "topology_devices"]
