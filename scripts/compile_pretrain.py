"""Will it fit on the pod? Compile the configured MLM train step ahead of time for a TPU slice, with no TPU.

    python scripts/compile_pretrain.py configs/pretrain/base-4096.yaml --topology v5e:4x4 [key=value ...]

Needs libtpu (``python scripts/install_libtpu.py``, found in ./.libtpu, or ``pip install "jax[tpu]==<your jax>"``)
but no TPU; JAX_PLATFORMS=cpu and ALLOW_MULTIPLE_LIBTPU_LOAD=1 are set unless already set. Prints the memory per chip
(arguments, outputs, temporaries, code; total against the chip's HBM), the collectives of the compiled program by
kind, the number of Mosaic kernel calls and the compile time. Topologies: v4:AxBxC, v5e:AxB, v5p:AxBxC, v6e:AxB
(chips = the product of the dimensions). A step over the chip's HBM is reported as not fitting (XLA:TPU may
refuse it at compile time: its message is shown). Exit status: 0 it fits, 3 it does not, 1 a bad config or
topology or a failed compile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Before JAX starts: compile for the topology with libtpu's compiler, using no local accelerator (also on a TPU VM,
# where a running job may hold the TPUs and libtpu's lockfile).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# libtpu where scripts/install_libtpu.py puts it (its own directory, off sys.path), unless one is importable already.
_LIBTPU = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".libtpu")
if os.path.isdir(_LIBTPU) and _LIBTPU not in sys.path:
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        sys.path.append(_LIBTPU)

from mra_jax.training.aot import compile_for_topology, format_report  # noqa: E402  (after the environment)
from mra_jax.training.config import PretrainConfig, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a YAML file under configs/pretrain/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. remat=full data.batch_size=64")
    parser.add_argument("--topology", required=True, help="e.g. v5e:4x4, v5p:2x2x4, v4:2x2x1, v6e:4x4")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--hlo", metavar="PATH", help="also write the compiled HLO text")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        report = compile_for_topology(cfg, args.topology, verbose=False, hlo_path=args.hlo)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a compile error of XLA or Mosaic (not running out of memory: that is a report)
        print(f"error: the compile failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"# {args.config} {' '.join(args.overrides)} on {args.topology}".rstrip())
    print(format_report(report), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report["fits"] else 3


if __name__ == "__main__":
    sys.exit(main())
