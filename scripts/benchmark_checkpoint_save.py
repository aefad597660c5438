"""Does saving a training checkpoint stall training? Step times of one run with and without a save in the step.

Runs the real jitted MLM train step (masking, AdamW, donated state) of a fresh model on random tokens and, every
``--save-every`` steps, starts `TrainCheckpoints.save` (asynchronous Orbax save with per-shard checksums) just
before the step. Reports the median wall time of steps without a save, of steps with one, of the `save` call
itself (the part of the save on the training thread), and what the saves cost the whole run. Usage:
  python scripts/benchmark_checkpoint_save.py                              # hidden 512, 4 layers
  python scripts/benchmark_checkpoint_save.py --hidden 64 --layers 2       # tiny
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mra_jax
from mra_jax.options import RuntimeOptions
from mra_jax.training import optim
from mra_jax.training.checkpointing import TrainCheckpoints
from mra_jax.training.masking import MaskingSpec
from mra_jax.training.pretrain import mlm_loss, mlm_masking
from mra_jax.training.runtime import batch_sharding
from mra_jax.training.step import init_state, make_train_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-every", type=int, default=5)
    args = parser.parse_args(argv)

    config = mra_jax.MraConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                               num_attention_heads=max(args.hidden // 64, 1), intermediate_size=4 * args.hidden,
                               max_position_embeddings=max(args.seq_len, 64))
    mesh = mra_jax.sharding.make_mesh(data=-1)
    spec = MaskingSpec(mask_id=args.vocab - 1, vocab_size=args.vocab, special_ids=(0, 1, 2, 3))
    schedule = optim.make_schedule(optim.OptimizerConfig(warmup_steps=0), args.steps)
    tx = optim.make_optimizer(optim.OptimizerConfig(), schedule)
    graphdef, state, shardings = init_state(
        lambda: mra_jax.MraForMaskedLM(config, rngs=nnx.Rngs(0), options=RuntimeOptions(mesh=mesh)), tx, mesh, "dp")
    sharding = batch_sharding(mesh)
    train = make_train_step(graphdef, tx, schedule, mlm_loss, seed=0, grad_accum_steps=1, shardings=shardings,
                            batch_sharding=sharding, prepare=mlm_masking(spec))
    rng = np.random.default_rng(0)
    batch = jax.device_put({"input_ids": jnp.asarray(rng.integers(4, args.vocab - 1, (args.batch, args.seq_len)),
                                                     jnp.int32),
                            "attention_mask": jnp.ones((args.batch, args.seq_len), jnp.int32)}, sharding)
    state, metrics = train(state, batch)  # compile
    jax.block_until_ready(metrics["loss"])
    params = sum(x.size for x in jax.tree.leaves(state.params))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))

    with tempfile.TemporaryDirectory() as directory:
        checkpoints = TrainCheckpoints(f"{directory}/checkpoints", keep=2)
        iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
        plain, saving, save_calls = [], [], []
        for step in range(1, args.steps + 1):
            start = time.perf_counter()
            save = step % args.save_every == 0
            if save:
                checkpoints.save(state, iterator, config, {"seed": 0})
                save_calls.append(time.perf_counter() - start)
            state, metrics = train(state, batch)
            jax.block_until_ready(metrics["loss"])
            (saving if save else plain).append(time.perf_counter() - start)
        start = time.perf_counter()
        checkpoints.wait()
        final_wait = time.perf_counter() - start
        checkpoints.close()

    ms = lambda xs: f"{1e3 * statistics.median(xs):.0f} ms"  # noqa: E731
    print(f"{jax.devices()[0].device_kind} x {jax.device_count()}, jax {jax.__version__}: hidden {args.hidden}, "
          f"{args.layers} layers, {params / 1e6:.1f}M parameters, state {state_bytes / 2**20:.0f} MiB, batch "
          f"{args.batch} x {args.seq_len}")
    print(f"step without a save {ms(plain)} (median of {len(plain)}), with a save {ms(saving)} (median of "
          f"{len(saving)}; max {1e3 * max(saving):.0f} ms), save() call {ms(save_calls)}, final wait "
          f"{1e3 * final_wait:.0f} ms")
    extra = sum(plain) + sum(saving) + final_wait - args.steps * statistics.median(plain)
    print(f"the run's {args.steps} steps and final wait took {extra:.2f} s more than {args.steps} steps without "
          f"a save: {1e3 * extra / len(saving):.0f} ms per save")
    return 0


if __name__ == "__main__":
    sys.exit(main())
