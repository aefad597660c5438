"""Run the bundled tiny HF checkpoints on their padded batches and compare with HF's stored outputs.

The outputs were computed by HF's PyTorch MRA with the real CUDA kernels on an H100 (tests/fixtures/golden).
Usage: python scripts/golden_parity.py [--golden DIR] [--tolerance 1e-4]
Exit status 1 if any output differs from HF's by more than the tolerance.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import jax.numpy as jnp
import numpy as np

import mra_jax

DEFAULT_GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden"


def compare_model(directory: pathlib.Path, implementation: str | None = None) -> list[tuple[str, float, float]]:
    """(output name, max abs error, error relative to the largest HF value) for each stored output; the attention
    ``implementation`` as in `mra_jax.options.RuntimeOptions` (None: the platform's best)."""
    from mra_jax.options import RuntimeOptions

    golden = np.load(directory / "golden_io.npz")
    model = mra_jax.model_class(mra_jax.MraConfig.from_pretrained(directory)).from_pretrained(
        directory, options=RuntimeOptions(implementation=implementation))
    inputs = {k: jnp.asarray(golden[k]) for k in golden.files if not k.startswith(("out_", "grad/"))}
    out = model(**inputs, output_hidden_states=True)
    rows = []
    for key in (k for k in golden.files if k.startswith("out_")):
        field = key.removeprefix("out_")
        if field.startswith("hidden_state_"):
            got = out.hidden_states[int(field.rsplit("_", 1)[1])]
        else:
            got = getattr(out, field)
        err = float(np.max(np.abs(np.asarray(got) - golden[key])))
        rows.append((field, err, err / max(float(np.max(np.abs(golden[key]))), 1e-30)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", type=pathlib.Path, default=DEFAULT_GOLDEN,
                        help="folder holding model_*/ (config.json, model.safetensors, golden_io.npz)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed max-abs error")
    parser.add_argument("--attention", choices=["reference", "pallas", "pallas_gpu", "pallas_tpu"], default=None,
                        help="attention implementation (default: the platform's best; pallas on a CPU interprets "
                             "the kernels, slowly)")
    args = parser.parse_args(argv)
    folders = sorted(p.parent for p in args.golden.glob("model_*/golden_io.npz"))
    if not folders:
        print(f"no model_* folders in {args.golden}", file=sys.stderr)
        return 2
    print(f"{'model':<32}{'output':<22}{'max abs err':>14}{'rel err':>12}")
    worst = 0.0
    for i, folder in enumerate(folders, 1):
        start = time.perf_counter()
        rows = compare_model(folder, args.attention)
        for field, err, rel in rows:
            if not math.isfinite(err) or err > worst:  # NaN or inf stays the worst
                worst = err
            print(f"{folder.name:<32}{field:<22}{err:>14.2e}{rel:>12.2e}")
        print(f"  [{i}/{len(folders)}] {folder.name} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    ok = math.isfinite(worst) and worst <= args.tolerance
    print(f"worst max-abs error {worst:.2e}: {'agrees with' if ok else 'DIFFERS from'} HF (tolerance "
          f"{args.tolerance:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
