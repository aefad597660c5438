"""Convert an HF MRA checkpoint (safetensors, sharded safetensors or pytorch_model.bin) into an Orbax checkpoint.

Usage: python scripts/convert_hf_to_orbax.py --hf-dir IN --out OUT [--architecture MraFor...]
       [--dtype float32|bfloat16] [--force]

OUT gets config.json and params/ (Orbax), written aside and moved into place only when complete. Tensors are read
one at a time. With --architecture naming another class than the checkpoint's, the checkpoint's head is dropped
and the new head initialised (both named in a warning); missing encoder tensors are always an error.
"""

from __future__ import annotations

import argparse
import sys
import time

import mra_jax
from mra_jax.atomic import check_output_dir
from mra_jax.modeling.models import MODEL_CLASSES
from mra_jax.options import DTYPES
from mra_jax.progress import ProgressBar


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True, help="HF checkpoint directory (config.json + weights)")
    parser.add_argument("--out", required=True, help="output directory for the Orbax checkpoint")
    parser.add_argument("--architecture", choices=sorted(MODEL_CLASSES),
                        help="model class (default: the architectures entry of config.json)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the stored parameters")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        check_output_dir(args.out, args.force)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        config = mra_jax.MraConfig.from_pretrained(args.hf_dir)
        cls = MODEL_CLASSES[args.architecture] if args.architecture else mra_jax.model_class(config)
        model = cls.from_pretrained(args.hf_dir, param_dtype=DTYPES[args.dtype], progress=ProgressBar("reading"))
        model.save_pretrained(args.out, force=args.force)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {cls.__name__} ({args.dtype}) to {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
