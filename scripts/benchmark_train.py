"""MLM training steps: MRA against the same encoder with dense attention (`jax.nn.dot_product_attention`).

Each case builds the masked LM with fresh weights on a data-parallel mesh over all devices, runs the real jitted
train step (dynamic masking, decoder at the masked positions, AdamW, clipping) on random tokens, and reports
tokens/s, MFU (model FLOPs, see `mra_jax.training.metrics`) and peak memory. Usage:
  python scripts/benchmark_train.py                      # base size, bf16, seq 512 / 4096 / 16384 (accelerator)
  python scripts/benchmark_train.py --small              # a CPU-sized model and lengths
  python scripts/benchmark_train.py --json results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mra_jax
from mra_jax.options import RuntimeOptions
from mra_jax.training import optim
from mra_jax.training.masking import MaskingSpec
from mra_jax.training.metrics import mlm_train_flops_per_token, peak_flops_per_device
from mra_jax.training.pretrain import mlm_loss, mlm_masking
from mra_jax.training.runtime import batch_sharding
from mra_jax.training.step import init_state, make_train_step

SMALL = mra_jax.MraConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=1024, max_position_embeddings=4096, block_per_row=8,
                          initial_prior_first_n_blocks=3, initial_prior_diagonal_n_blocks=1)


def _peak_memory(compiled) -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes)


def run_case(config: mra_jax.MraConfig, seq: int, tokens: int, attention: str, dtype, remat: str, steps: int,
             ) -> dict:
    batch = max(tokens // seq, 1)
    devices = jax.device_count()
    batch = -(-batch // devices) * devices
    config = dataclasses.replace(config, max_position_embeddings=max(config.max_position_embeddings, seq))
    mesh = mra_jax.sharding.make_mesh(data=-1)
    options = RuntimeOptions(implementation="dense" if attention == "dense" else None, mesh=mesh, remat=remat)
    spec = MaskingSpec(mask_id=config.vocab_size - 1, vocab_size=config.vocab_size, special_ids=(0, 1, 2, 3))
    cfg = optim.OptimizerConfig(warmup_steps=0)
    schedule = optim.make_schedule(cfg, 1000)
    tx = optim.make_optimizer(cfg, schedule)
    start = time.perf_counter()
    graphdef, state, shardings = init_state(
        lambda: mra_jax.MraForMaskedLM(config, rngs=nnx.Rngs(0), dtype=dtype, options=options), tx, mesh, "dp")
    jax.block_until_ready(state)
    print(f"  seq {seq} {attention}: initialised in {time.perf_counter() - start:.1f} s, compiling the step",
          file=sys.stderr, flush=True)
    sharding = batch_sharding(mesh)
    step = make_train_step(graphdef, tx, schedule, mlm_loss, seed=0, grad_accum_steps=1, shardings=shardings,
                           batch_sharding=sharding, prepare=mlm_masking(spec))
    ids = np.random.default_rng(0).integers(4, config.vocab_size - 1, (batch, seq)).astype(np.int32)
    data = jax.device_put({"input_ids": ids, "attention_mask": np.ones_like(ids)}, sharding)
    start = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens_per_second = batch * seq / seconds
    flops = mlm_train_flops_per_token(config, seq, spec.num_predictions(seq), dense_attention=attention == "dense")
    peak = peak_flops_per_device()
    return {"seq": seq, "batch": batch, "attention": attention, "step_ms": seconds * 1e3,
            "tokens_per_second": tokens_per_second,
            "mfu": None if peak is None else tokens_per_second * flops / (peak * devices),
            "peak_memory_gib": (lambda m: None if m is None else m / 2**30)(_peak_memory(compiled)),
            "compile_s": compile_s, "loss": float(metrics["loss"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="configs/models/mra-base-4096-8-d3.json", help="a config.json")
    parser.add_argument("--seqs", default="512,4096,16384")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per step (batch = tokens / seq)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--attention", default="mra,dense")
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="CPU sizes: 4 layers of 256, seq 512/2048, float32")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    config = mra_jax.MraConfig.from_pretrained(args.model)
    if args.small:
        config, args.seqs, args.tokens, args.dtype, args.steps = SMALL, "512,2048", 8192, "float32", 3
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    results = []
    print(f"{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, {args.dtype}, "
          f"{config.num_hidden_layers} layers of {config.hidden_size}, vocab {config.vocab_size}, "
          f"{args.tokens} tokens/step, remat {args.remat}")
    print("| seq | batch | attention | step ms | tokens/s | MFU | peak GiB | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for seq in (int(s) for s in args.seqs.split(",")):
        for attention in args.attention.split(","):
            try:
                r = run_case(config, seq, args.tokens, attention, dtype, args.remat, args.steps)
            except Exception as e:  # out of memory and the like: a row saying so, the other cases still run
                r = {"seq": seq, "attention": attention, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                print(f"| {seq} | | {attention} | {r['error']} | | | | |", flush=True)
                results.append(r)
                continue
            results.append(r)
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            mem = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
            print(f"| {seq} | {r['batch']} | {attention} | {r['step_ms']:.1f} | {r['tokens_per_second']:,.0f} | "
                  f"{mfu} | {mem} | {r['compile_s']:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
                       "devices": jax.device_count(), "jax": jax.__version__, "python": platform.python_version(),
                       "args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
