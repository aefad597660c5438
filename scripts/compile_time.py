"""Compile time of the MLM pretraining train step against depth, with the layers scanned and as a Python loop.

Lowers and compiles (ahead of time, abstract inputs: nothing is allocated) the train step that
`mra_jax.training.pretrain.build_pretraining` builds from ``configs/pretrain/tiny.yaml`` with the options below, for
each number of layers, and prints a table of the lower and
compile seconds. The model is ``--model`` (a config.json) with its depth replaced and, optionally, its width.

    python scripts/compile_time.py                                   # tiny width on the CPU, 2 / 12 / 24 layers
    python scripts/compile_time.py --model configs/models/mra-base-4096-8-d3.json --layers 12 --target v5p:2x2x1 \\
        --seq-len 4096 --batch 4 --dtype bfloat16 --remat dots       # deviceless TPU compile (libtpu needed)
    python scripts/compile_time.py --target h100 --h100-target-config h100_target_config.txtpb ...

Targets: ``cpu`` (the local CPU devices; ``--devices`` of them), a TPU topology such as ``v5p:2x2x1`` (libtpu's
compiler; run with JAX_PLATFORMS=cpu, see scripts/compile_pretrain.py), or ``h100`` (XLA:GPU's deviceless compile;
needs the jax CUDA PJRT plugin, ptxas found through XLA_FLAGS=--xla_gpu_cuda_data_dir=..., and an H100 target
description). Each case runs in its own process (``--timeout`` seconds at most: a case over it is reported as
such), so that one compile's caches do not help the next.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_case(args: argparse.Namespace, layers: int, scan: bool) -> dict:
    """One compile in this process: the report of `mra_jax.training.aot.compile_train_step`."""
    import jax

    from mra_jax.training import aot
    from mra_jax.training.config import PretrainConfig, load_config

    with open(args.model) as f:
        model = json.load(f)
    model["num_hidden_layers"] = layers
    for key, value in (("hidden_size", args.hidden), ("num_attention_heads", args.heads),
                       ("intermediate_size", args.intermediate)):
        if value is not None:
            model[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            json.dump(model, f)
        os.chdir(ROOT)  # the recipe's relative paths
        cfg = load_config(PretrainConfig, os.path.join(ROOT, "configs", "pretrain", "tiny.yaml"), [
            f"model={path}", f"scan_layers={scan}", f"remat={args.remat}", f"dtype={args.dtype}",
            f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch}", f"mesh.data={args.data}",
            f"mesh.fsdp={args.fsdp}", f"mesh.rules={args.rules}",
            *([f"attention={args.attention}"] if args.attention else [])])
        if args.target == "cpu":
            devices = jax.devices("cpu")[:args.devices]
        elif args.target == "h100":
            from jax.experimental import topologies

            with open(args.h100_target_config) as f:
                target = f.read()
            devices = topologies.get_topology_desc(platform="cuda", topology_name="h100", topology="1x1x1",
                                                   target_config=target).devices
        else:
            devices = aot.topology_devices(args.target)
        return aot.compile_train_step(cfg, devices, target=args.target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(ROOT, "configs", "models", "mra-tiny.json"),
                        help="a config.json (default: the tiny one)")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 12, 24])
    parser.add_argument("--scan", choices=["both", "on", "off"], default="both")
    parser.add_argument("--hidden", type=int, help="override hidden_size")
    parser.add_argument("--heads", type=int, help="override num_attention_heads")
    parser.add_argument("--intermediate", type=int, help="override intermediate_size")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    parser.add_argument("--attention", help="reference, pallas, dense (default: the platform's best)")
    parser.add_argument("--data", type=int, default=-1, help="mesh.data")
    parser.add_argument("--fsdp", type=int, default=1, help="mesh.fsdp")
    parser.add_argument("--rules", default="fsdp")
    parser.add_argument("--target", default="cpu", help="cpu, h100 or a TPU topology such as v5p:2x2x1")
    parser.add_argument("--devices", type=int, default=1, help="number of CPU devices (target cpu)")
    parser.add_argument("--h100-target-config", help="XLA:GPU target description of an H100 (target h100)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per case")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: LAYERS,SCAN in a child process
    args = parser.parse_args(argv)
    if args.target == "h100" and not args.h100_target_config:
        parser.error("--target h100 needs --h100-target-config")

    if args.case:
        layers, scan = args.case.split(",")
        print("RESULT " + json.dumps(compile_case(args, int(layers), scan == "1")), flush=True)
        return 0

    argv = sys.argv[1:] if argv is None else argv
    scans = {"both": [False, True], "on": [True], "off": [False]}[args.scan]
    print(f"{'layers':>6} {'scan':>5} {'lower s':>8} {'compile s':>10}  target {args.target}, model {args.model}, "
          f"seq {args.seq_len} x batch {args.batch}, {args.dtype}, remat {args.remat}", flush=True)
    results = []
    for layers in args.layers:
        for scan in scans:
            try:
                done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv,
                                       f"--case={layers},{int(scan)}"], capture_output=True, text=True,
                                      timeout=args.timeout)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
                if not lines:
                    raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no result")
                report = json.loads(lines[-1][7:])
                row = {"layers": layers, "scan": scan, "lower_s": report["lower_s"],
                       "compile_s": report["compile_s"], "num_params": report["num_params"],
                       "memory_per_device": report["memory_per_device"]}
                print(f"{layers:>6} {'yes' if scan else 'no':>5} {row['lower_s']:>8.1f} {row['compile_s']:>10.1f}",
                      flush=True)
            except subprocess.TimeoutExpired:
                row = {"layers": layers, "scan": scan, "error": f"over {args.timeout:.0f} s"}
                print(f"{layers:>6} {'yes' if scan else 'no':>5}  stopped after {args.timeout:.0f} s", flush=True)
            except RuntimeError as e:
                row = {"layers": layers, "scan": scan, "error": str(e)}
                print(f"{layers:>6} {'yes' if scan else 'no':>5}  failed: {e}", flush=True)
            results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
