"""Time the GPU kernels' launch settings (num_warps, num_stages, chunk) one kernel at a time, to choose the table in
`pallas_kernels.gpu` (`_LAUNCH`) by measurement rather than by ptxas's spill report alone.

Each setting replaces the table's entry for one (kernel, dtype, head_dim) and times that kernel alone (forward, dQ or
dK/dV) on the same inputs: a random selection of ``seq / 32 · block_per_row`` block pairs per (batch, head), as MRA's
global top-k gives (ragged rows), no padding. A setting that does not compile (shared memory, registers) is reported
and skipped. Prints every timing, then the fastest setting per (kernel, dtype, head_dim) as table entries. Usage:
  python scripts/tune_gpu_kernels.py                      # bf16, head_dim 64 / 128, seq 4096 (GPU; ~100 settings)
  python scripts/tune_gpu_kernels.py --dtypes float32 --dims 64 --json tune.json
  python scripts/tune_gpu_kernels.py --small              # CPU, interpret mode: only checks that the script runs
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import sys

import jax
import jax.numpy as jnp

from pallas_kernels import BLOCK, build_block_layout
from pallas_kernels import gpu as gpu_kernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_attention import _time  # the same timing as the attention benchmark


def _problem(batch: int, seq: int, heads: int, head_dim: int, block_per_row: int, dtype):
    n = seq // BLOCK
    pairs = min(n * block_per_row, n * n)
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v, do = (jax.random.normal(kk, (batch, seq, heads, head_dim), dtype) for kk in keys[:4])
    choose = jax.vmap(lambda key: jax.random.choice(key, n * n, (pairs,), replace=False))
    layout = jax.jit(build_block_layout, static_argnums=1)(choose(jax.random.split(keys[4], batch * heads)), n)
    return q, k, v, do, layout


def _kernels(q, k, v, do, layout, interpret: bool) -> dict:
    """The three kernels as functions of (q, k, v), with lse and delta from one forward at the table's settings."""
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
    kw = dict(sm_scale=sm_scale, interpret=interpret)
    o, lse = jax.jit(lambda q, k, v: gpu_kernels.attention_forward(q, k, v, layout, None, **kw))(q, k, v)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    return {
        "fwd": lambda: jax.jit(lambda q, k, v: gpu_kernels.attention_forward(q, k, v, layout, None, **kw)),
        "dq": lambda: jax.jit(lambda q, k, v: gpu_kernels.attention_dq(q, k, v, layout, None, lse, do, delta, **kw)),
        "dkv": lambda: jax.jit(lambda q, k, v: gpu_kernels.attention_dkv(q, k, v, layout, None, lse, do, delta, **kw)),
    }


def tune(dtypes: list[str], dims: list[int], seq: int, tokens: int, heads: int, block_per_row: int,
         settings: list[tuple[int, int, int]], repeats: int, interpret: bool) -> list[dict]:
    rows = []
    default = dict(gpu_kernels._LAUNCH)
    try:
        for dtype_name, head_dim in itertools.product(dtypes, dims):
            dtype = jnp.dtype(dtype_name)
            q, k, v, do, layout = _problem(max(tokens // seq, 1), seq, heads, head_dim, block_per_row, dtype)
            kernels = _kernels(q, k, v, do, layout, interpret)
            for name, make in kernels.items():
                entry = (name, dtype == jnp.float32, gpu_kernels._padded_dim(head_dim) <= 64)
                for setting in settings:
                    gpu_kernels._LAUNCH[entry] = setting
                    row = {"kernel": name, "dtype": dtype_name, "head_dim": head_dim, "warps": setting[0],
                           "stages": setting[1], "chunk": setting[2], "current": setting == default[entry]}
                    try:
                        row["ms"] = _time(make(), q, k, v, repeats=repeats)
                    except Exception as e:  # does not compile or run with this setting: say so, go on
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    rows.append(row)
                    print(f"  {name} {dtype_name} d{head_dim} {setting}: {row.get('ms', row.get('error'))}",
                          file=sys.stderr, flush=True)
                gpu_kernels._LAUNCH[entry] = default[entry]
    finally:
        gpu_kernels._LAUNCH.clear()
        gpu_kernels._LAUNCH.update(default)
    return rows


def print_tables(rows: list[dict]) -> None:
    print("| kernel | dtype | head_dim | warps | stages | chunk | ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ms = f"{r['ms']:.3f}" if "ms" in r else r["error"]
        mark = " (table now)" if r["current"] else ""
        print(f"| {r['kernel']} | {r['dtype']} | {r['head_dim']} | {r['warps']} | {r['stages']} | {r['chunk']} | "
              f"{ms}{mark} |")
    print("\nFastest per (kernel, dtype, head_dim), as `_LAUNCH` entries:")
    groups = itertools.groupby(rows, key=lambda r: (r["kernel"], r["dtype"], r["head_dim"]))
    for (name, dtype, head_dim), group in groups:
        timed = [r for r in group if "ms" in r]
        if timed:
            best = min(timed, key=lambda r: r["ms"])
            current = next((r for r in timed if r["current"]), None)
            vs = f", table now {current['ms']:.3f} ms" if current else ""
            print(f'    ("{name}", {dtype == "float32"}, {gpu_kernels._padded_dim(head_dim) <= 64}): '
                  f"({best['warps']}, {best['stages']}, {best['chunk']}),  # {best['ms']:.3f} ms{vs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per call (batch = tokens / seq)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--block-per-row", type=int, default=8)
    parser.add_argument("--warps", default="2,4,8")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--chunks", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--small", action="store_true", help="CPU (interpret mode), tiny shapes, two settings")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    if args.small:
        args.dtypes, args.dims, args.seq, args.tokens, args.heads, args.repeats = "float32", "32", 64, 128, 2, 1
        settings = [(4, 2, 1), (4, 2, 2)]
    else:
        settings = list(itertools.product(ints(args.warps), ints(args.stages), ints(args.chunks)))
    interpret = jax.default_backend() != "gpu"
    rows = tune(args.dtypes.split(","), ints(args.dims), args.seq, args.tokens, args.heads, args.block_per_row,
                settings, args.repeats, interpret)
    print(f"{datetime.date.today().isoformat()} {jax.devices()[0].device_kind}, jax {jax.__version__}, seq {args.seq}, "
          f"{args.tokens} tokens per call, {args.heads} heads, block_per_row {args.block_per_row}"
          + (" (interpret mode: timings say nothing)" if interpret else ""))
    print_tables(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
                       "jax": jax.__version__, "args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
