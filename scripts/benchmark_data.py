"""Time to the first training step and peak host memory of scripts/pretrain.py against the size of its token store.

    python scripts/benchmark_data.py STORE... [--config configs/pretrain/tiny.yaml] [--repeat 2] [--set key=value]

Each store is trained from for one step (`data.prepared=STORE steps=1`, in a fresh process, alternating between the
stores `--repeat` times); the table gives the store's tokens, the seconds from the process start to the end of step 1
(`pretrain: step 1 took` on the console) and the process's peak RSS (getrusage of the child).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def first_step(store: str, config: str, overrides: list[str]) -> tuple[float, float]:
    """(seconds to the end of step 1, peak RSS in MiB) of one pretraining process on ``store``."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), config, f"data.prepared={store}", "steps=1",
               "optimizer.warmup_steps=0", "eval_every=0", "progress_bar=false", "tensorboard=false",
               f"output_dir={out}/run", *overrides]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds = None
        for line in proc.stdout:
            if seconds is None and "step 1 took" in line:
                seconds = time.perf_counter() - start
        if proc.wait() != 0 or seconds is None:
            raise SystemExit(f"pretraining on {store} failed (exit {proc.returncode})")
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stores", nargs="+", help="token store directories (scripts/prepare_data.py)")
    parser.add_argument("--config", default="configs/pretrain/tiny.yaml")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="an override of the pretraining config (repeatable)")
    args = parser.parse_args(argv)
    results: dict[str, list[tuple[float, float]]] = {s: [] for s in args.stores}
    for _ in range(args.repeat):
        for store in args.stores:
            # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: measure each run in a process of its own
            out = subprocess.run([sys.executable, "-c", "import sys, json; sys.path.insert(0, sys.argv[1]); "
                                  "from benchmark_data import first_step; "
                                  "print(json.dumps(first_step(sys.argv[2], sys.argv[3], sys.argv[4:])))",
                                  str(ROOT / "scripts"), store, args.config, *args.overrides],
                                 cwd=ROOT, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr, file=sys.stderr)
                return 1
            results[store].append(tuple(json.loads(out.stdout)))
    print("| store | tokens | time to step 1 (s), each run | peak RSS (MiB), each run |")
    print("|---|---|---|---|")
    for store, runs in results.items():
        meta = json.loads((pathlib.Path(store) / "metadata.json").read_text())
        tokens = sum(split["tokens"] for split in meta["splits"].values())
        print(f"| {store} | {tokens:,} | {' / '.join(f'{t:.1f}' for t, _ in runs)} | "
              f"{' / '.join(f'{m:.0f}' for _, m in runs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
