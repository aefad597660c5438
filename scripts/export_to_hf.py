"""Export an Orbax checkpoint of mra-jax (or any checkpoint from_pretrained reads) as an HF directory.

Usage: python scripts/export_to_hf.py --checkpoint IN --out OUT [--tokenizer tokenizer.json] [--force]
    [--allow-unverified]

OUT gets config.json and model.safetensors (float32) that transformers' MraFor* classes load with no missing or
unexpected keys, and the tokenizer (the checkpoint's, or its training run's: tokenizer.json with a
tokenizer_config.json, so that transformers' AutoTokenizer gives the ids the model was trained on); it is written
aside and moved into place only when complete. A training checkpoint's checksums are verified first.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import mra_jax
from mra_jax.atomic import check_output_dir
from mra_jax.progress import ProgressBar
from mra_jax.training.predict import find_model_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="Orbax checkpoint directory (config.json + params/)")
    parser.add_argument("--out", required=True, help="output HF directory")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer.json to export (default: the checkpoint's, or its training run's)")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="use a training checkpoint that has no checksums (its content is then not verified)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        check_output_dir(args.out, args.force)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        cls = mra_jax.model_class(mra_jax.MraConfig.from_pretrained(args.checkpoint))
        try:
            tokenizer = find_model_tokenizer(pathlib.Path(args.checkpoint), args.tokenizer)
        except ValueError as e:
            if args.tokenizer:
                raise
            tokenizer = None
            print(f"note: {e}; the export has no tokenizer", file=sys.stderr)
        model = cls.from_pretrained(args.checkpoint, progress=ProgressBar("reading"), verify=not args.allow_unverified)
        model.save_pretrained(args.out, format="hf", force=args.force, tokenizer=tokenizer)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {cls.__name__} as an HF checkpoint to {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
