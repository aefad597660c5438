"""MRA attention (Pallas kernels and jnp reference) against dense attention, forward and forward+backward.

Peers in the same run: `jax.nn.dot_product_attention` with implementation="cudnn" (GPU only) and "xla". Shapes as
the design's goals: a fixed number of tokens per call (batch = tokens / seq), 12 heads of 64, bfloat16, MRA budget
`(seq / 32) * block_per_row` pairs. Each stage of the MRA forward is also timed on its own ("full" mode, inputs
precomputed): low resolution (block sums and selection scores), selection + block lists, the low-resolution output
per query block, the high-resolution kernel with the merge of both parts; and `lax.top_k` as the selection's peer.
Sizes that do not fit are reported as skipped. Usage:
  python scripts/benchmark_attention.py                      # 65,536 tokens at seq 512 ... 65536 (accelerator)
  python scripts/benchmark_attention.py --small              # a CPU-sized run (Pallas in interpret mode)
  python scripts/benchmark_attention.py --json results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from mra_jax.attention import mra_attention
from mra_jax.attention.combination import low_resolution_output
from mra_jax.attention.low_resolution import EPS, block_sums, selection_scores
from mra_jax.attention.selection import select_blocks
from pallas_kernels import build_block_layout, merged_attention


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
    return out


def kernel_traffic(batch: int, seq: int, heads: int, head_dim: int, num_blocks: int, itemsize: int) -> dict:
    """The kernels' own HBM bytes (XLA's cost analysis cannot see inside them), analytically; ``Q`` = the bytes of q.

    Upper bound, no cache reuse (every visit of a selected pair loads its two 32-row tiles): forward 2 Q (q, o) + the
    tiles, dQ 3 Q (q, dO, dQ) + the tiles, dK/dV 4 Q (k, v, dK, dV) + the tiles, the tiles being
    ``2 · pairs / n`` Q (plus their float32 lse / delta rows). Lower bound, each tile read once (a (batch, head)'s
    K/V is 2 · S · d bytes, which stays in L2 while the grid walks its query blocks): forward 4 Q, dQ 5 Q, dK/dV 6 Q.

    The GPU low-resolution and selection kernels: the scores kernel writes the ``n x n`` float32 scores of every
    (batch, head) once, the selection reads them once per pass (9 passes, a row of up to 2^16 scores from L2 in the
    one-program kernel, from HBM in the chunked one for longer rows) and writes n·n bits; the low-resolution kernels
    read only the block sums (n · d per (batch, head), from L2).
    """
    n = seq // 32
    q = batch * seq * heads * head_dim * itemsize
    tiles = 2 * num_blocks / n * q * (1 + 4 / (head_dim * itemsize))
    scores = batch * heads * n * n * 4
    gib = 2**30
    return {"q_GiB": q / gib, "kernel_fwd_GiB": (2 * q + tiles) / gib, "kernel_dq_GiB": (3 * q + tiles) / gib,
            "kernel_dkv_GiB": (4 * q + tiles) / gib, "kernel_fwd_min_GiB": 4 * q / gib,
            "kernel_dq_min_GiB": 5 * q / gib, "kernel_dkv_min_GiB": 6 * q / gib,
            "scores_write_GiB": scores / gib, "selection_reads_GiB": 9 * scores / gib}


def stages(q, k, v, num_blocks: int, backend: str) -> dict:
    """The stages of the MRA forward as separate jitted functions with their inputs, in order: low resolution (block
    sums and selection scores), selection + block lists, the low-resolution output per query block, and the kernel
    with the merge of both parts in its epilogue (on GPUs; elsewhere the merge follows the kernel)."""
    n, scale = q.shape[1] // 32, math.sqrt(q.shape[-1])
    kernels = {"gpu": "gpu", "tpu": "tpu"}.get(backend, "reference")
    count = None  # no padding: 32 tokens in every block, as mra_attention passes it

    gpu = kernels == "gpu"  # the GPU kernels of every stage, as mra_attention uses them

    def select(scores):
        indices, bits = select_blocks(scores, num_blocks, gpu_kernel=gpu)
        return build_block_layout(indices.reshape(-1, num_blocks), n, ascending=True), bits

    def low_res(q, k, v):
        sums = tuple(block_sums(x, None) for x in (q, k, v))
        return sums, selection_scores(*sums[:2], count, scale, gpu_kernel=gpu)

    def output(sums, bits):
        return low_resolution_output(sums, (count, bits), scale=scale, gpu_kernel=gpu)

    def attend(q, k, v, layout, sums, low):  # the low-resolution part precomputed, passed through low_aux
        return merged_attention(q, k, v, layout, sm_scale=1 / scale, eps=EPS, low_fn=lambda _, low: low,
                                block_sums=sums, low_aux=low, backend=kernels)

    sums, scores = jax.jit(low_res)(q, k, v)
    layout, bits = jax.jit(select)(scores)
    low = jax.jit(output)(sums, bits)
    return {
        "low_resolution": (jax.jit(low_res), (q, k, v)),
        "selection_lists": (jax.jit(select), (scores,)),
        "selection_lax_top_k": (jax.jit(lambda s: jax.lax.top_k(s.reshape(*s.shape[:-2], -1), num_blocks)[1]),
                                (scores,)),
        "low_resolution_output": (jax.jit(output), (sums, bits)),
        "kernel_merged": (jax.jit(attend), (q, k, v, layout, sums, low)),
    }


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
        row = {"seq": seq, "batch": batch, "num_blocks": num_blocks,
               **kernel_traffic(batch, seq, heads, head_dim, num_blocks, jnp.dtype(dtype).itemsize)}
        try:
            for name, (fn, args) in stages(q, k, v, num_blocks, backend).items():
                row[f"stage_{name}_ms"] = _time(fn, *args, repeats=repeats)
        except Exception as e:  # report and go on (out of memory, unsupported)
            row["stage_low_resolution_ms"] = f"skipped: {type(e).__name__}"
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
    traffic = [c for c in rows[0] if c.endswith("_GiB")] if rows else []
    print("Kernels' own HBM traffic (analytic, XLA's cost analysis does not see it; no cache reuse, _min: each tile "
          "read once):")
    for r in rows:
        print(f"  seq {r['seq']}: " + ", ".join(f"{c.removesuffix('_GiB')} {r[c]:.2f} GiB" for c in traffic))
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
