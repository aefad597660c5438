"""MRA attention (Pallas kernels and jnp reference) against dense attention, forward and forward+backward.

Peers in the same run: `jax.nn.dot_product_attention` with implementation="cudnn" (GPU only) and "xla". Shapes as
the design's goals: a fixed number of tokens per call (batch = tokens / seq), 12 heads of 64, bfloat16, MRA budget
`(seq / 32) * block_per_row` pairs. Selection (low resolution + top-k) is timed on its own. Sizes that do not fit are
reported as skipped. Usage:
  python scripts/benchmark_attention.py                      # 65,536 tokens at seq 512 ... 65536 (accelerator)
  python scripts/benchmark_attention.py --small              # a CPU-sized run (Pallas in interpret mode)
  python scripts/benchmark_attention.py --json results.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from mra_jax.attention import mra_attention
from mra_jax.attention.low_resolution import low_resolution
from mra_jax.attention.selection import select_blocks


def _time(fn, *args, repeats: int) -> float:
    """Median milliseconds of ``fn(*args)`` after one compile-and-run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _variants(num_blocks: int, backend: str) -> dict:
    def mra(impl):
        return lambda q, k, v: mra_attention(q, k, v, None, num_blocks=num_blocks, implementation=impl)

    def dense(impl):
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl)

    out = {"mra_pallas": mra("pallas"), "mra_reference": mra("reference"), "dense_xla": dense("xla")}
    if backend == "gpu":
        out["dense_cudnn"] = dense("cudnn")
    if backend == "tpu":
        del out["mra_pallas"]  # the TPU kernels are not wired in yet
    return out


def selection(q: jax.Array, k: jax.Array, num_blocks: int, lax_top_k: bool = False) -> jax.Array:
    """Stage 1 (block means and logits) and stage 2 (top-k) alone; ``lax_top_k`` for the peer selection."""
    qh, kh = (x.transpose(0, 2, 1, 3).astype(jnp.float32) for x in (q, k))
    ones = jnp.ones((q.shape[0], 1, q.shape[1]), jnp.float32)
    low = low_resolution(qh, kh, None, ones, math.sqrt(q.shape[-1]))
    if lax_top_k:
        return jax.lax.top_k(low.scores.reshape(*low.scores.shape[:-2], -1), num_blocks)[1]
    return select_blocks(low.scores, num_blocks)


def run(seqs: list[int], tokens: int, heads: int, head_dim: int, block_per_row: int, dtype, repeats: int,
        skip: set[str]) -> list[dict]:
    backend = jax.default_backend()
    rows = []
    for seq in seqs:
        batch = max(tokens // seq, 1)
        n = seq // 32
        num_blocks = min(n * block_per_row, n * n)
        keys = jax.random.split(jax.random.key(0), 4)
        q, k, v, w = (jax.random.normal(kk, (batch, seq, heads, head_dim), dtype) for kk in keys)
        row = {"seq": seq, "batch": batch, "num_blocks": num_blocks}
        for key, peer in (("selection_ms", False), ("selection_lax_top_k_ms", True)):
            try:
                fn = jax.jit(functools.partial(selection, num_blocks=num_blocks, lax_top_k=peer))
                row[key] = _time(fn, q, k, repeats=repeats)
            except Exception as e:  # report and go on (out of memory, unsupported)
                row[key] = f"skipped: {type(e).__name__}"
        for name, fn in _variants(num_blocks, backend).items():
            if name in skip:
                continue
            loss = lambda q, k, v, fn=fn, w=w: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)  # noqa: E731
            for mode, f in (("fwd", jax.jit(fn)), ("fwd_bwd", jax.jit(jax.grad(loss, argnums=(0, 1, 2))))):
                try:
                    row[f"{name}_{mode}_ms"] = _time(f, q, k, v, repeats=repeats)
                except Exception as e:
                    row[f"{name}_{mode}_ms"] = f"skipped: {type(e).__name__}"
            print(f"  seq {seq}: {name} done", file=sys.stderr)
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    columns = sorted({c for r in rows for c in r if c.endswith("_ms")})
    print("| seq | batch | pairs | " + " | ".join(c.removesuffix("_ms") + " (ms)" for c in columns) + " |")
    print("|---" * (3 + len(columns)) + "|")
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
        print(f"| {r['seq']} | {r['batch']} | {r['num_blocks']} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per call (batch = tokens / seq)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-per-row", type=int, default=8)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--skip", default="", help="comma-separated variants to leave out (e.g. mra_reference)")
    parser.add_argument("--small", action="store_true", help="CPU-sized defaults: seq 128,256, 512 tokens")
    parser.add_argument("--json", default=None, help="write results and environment here")
    args = parser.parse_args(argv)
    seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else (
        [128, 256] if args.small else [512, 1024, 4096, 16384, 65536])
    tokens = args.tokens or (512 if args.small else 65536)
    repeats = args.repeats or (2 if args.small else 20)
    rows = run(seqs, tokens, args.heads, args.head_dim, args.block_per_row, jnp.dtype(args.dtype), repeats,
               set(filter(None, args.skip.split(","))))
    env = {"date": datetime.date.today().isoformat(), "device": str(jax.devices()[0].device_kind),
           "backend": jax.default_backend(), "jax": jax.__version__, "python": platform.python_version(),
           "tokens_per_call": tokens, "heads": args.heads, "head_dim": args.head_dim,
           "block_per_row": args.block_per_row, "dtype": args.dtype, "repeats": repeats}
    print(f"{env['date']} {env['device']} ({env['backend']}), jax {env['jax']}, {args.dtype}, {tokens} tokens per "
          f"call, {args.heads}x{args.head_dim}, block_per_row {args.block_per_row}")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
