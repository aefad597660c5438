"""Time and peak memory of converting a base-size MRA checkpoint (768 hidden, 12 layers, vocab 50265).

Makes the HF checkpoint locally with transformers (random weights, MraForMaskedLM, float32 safetensors), then runs
scripts/convert_hf_to_orbax.py and scripts/export_to_hf.py each in a fresh process and reports wall time and peak
RSS against the checkpoint size. Usage: python scripts/benchmark_conversion.py [--workdir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

SCRIPTS = pathlib.Path(__file__).resolve().parent


def make_checkpoint(directory: pathlib.Path, fmt: str) -> int:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.MraForMaskedLM(transformers.MraConfig())
    if fmt == "bin":
        directory.mkdir(parents=True)
        model.config.architectures = ["MraForMaskedLM"]
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    else:
        model.save_pretrained(directory)
    return sum(f.stat().st_size for f in directory.iterdir() if f.suffix in (".safetensors", ".bin"))


def run(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a child process."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, *args], stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"{args[0]} failed with exit code {child.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=pathlib.Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    work = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="mra-conv-bench-"))
    hf, orbax, back = work / "hf", work / "orbax", work / "back"
    size = make_checkpoint(hf, args.format) / 2**20
    convert = run([str(SCRIPTS / "convert_hf_to_orbax.py"), "--hf-dir", str(hf), "--out", str(orbax), "--force"])
    export = run([str(SCRIPTS / "export_to_hf.py"), "--checkpoint", str(orbax), "--out", str(back), "--force"])
    import jax

    results = {
        "checkpoint": f"MraForMaskedLM base (125M params), {args.format}", "checkpoint_mib": round(size, 1),
        "convert_s": round(convert[0], 2), "convert_peak_rss_mib": round(convert[1], 1),
        "export_s": round(export[0], 2), "export_peak_rss_mib": round(export[1], 1),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "jax": jax.__version__,
        "python": platform.python_version(),
    }
    print(f"{'step':<10}{'seconds':>10}{'peak RSS MiB':>15}{'x checkpoint':>14}")
    for step, (seconds, rss) in (("convert", convert), ("export", export)):
        print(f"{step:<10}{seconds:>10.2f}{rss:>15.1f}{rss / size:>14.2f}")
    print(f"checkpoint {size:.1f} MiB ({args.format})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
