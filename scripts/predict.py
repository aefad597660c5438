"""Predictions of a fine-tuned MRA for a data file (CSV, JSONL or Parquet), one JSON line per row.

    python scripts/predict.py MODEL_DIR DATA_FILE [--out predictions.jsonl] [--force] [key=value ...]

MODEL_DIR is a fine-tuning run's HF export (output_dir/hf) or one of its checkpoints (output_dir/checkpoints/N); its
config names the task and the labels, and the tokenizer.json beside it is used. The data fields (names,
max_seq_len, bucket) are the fine-tuning run's (its config.yaml); key=value overrides change them. Rows need the
input fields only; where they also carry labels, the task metrics are printed.
"""

from __future__ import annotations

import argparse
import os
import sys

from mra_jax.training.predict import predict, run_data_config, write_predictions


def check_out(out: str, data_file: str, force: bool, batch_size: int) -> None:
    """Refuse, before any work, an output that is the input, an existing one without ``force``, a bad batch size."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if os.path.exists(out) and os.path.exists(data_file) and os.path.samefile(out, data_file):
        raise ValueError(f"--out {out} is the input file {data_file}: predictions would replace the data")
    if os.path.exists(out) and not force:
        raise ValueError(f"{out} exists; pass --force to replace it, or --out another file")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a fine-tuned HF export or checkpoint directory")
    parser.add_argument("file", help="rows to predict (.csv, .jsonl, .parquet)")
    parser.add_argument("overrides", nargs="*", help="data fields, key=value")
    parser.add_argument("--out", default=None, help="predictions JSONL (default: FILE's name + .predictions.jsonl)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: the model directory's)")
    parser.add_argument("--attention", default=None, choices=["reference", "pallas", "dense"])
    parser.add_argument("--force", action="store_true", help="replace an existing predictions file")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="use a training checkpoint that has no checksums (its content is then not verified)")
    args = parser.parse_args(argv)
    out = args.out or f"{args.file.rsplit('.', 1)[0]}.predictions.jsonl"
    try:
        check_out(out, args.file, args.force, args.batch_size)
        data = run_data_config(args.model, args.overrides)
        predictions, metrics = predict(args.model, args.file, data=data, tokenizer=args.tokenizer,
                                       batch_size=args.batch_size, attention=args.attention,
                                       allow_unverified=args.allow_unverified, progress="predict")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    write_predictions(predictions, out)
    print(f"{len(predictions)} predictions -> {out}")
    if metrics is not None:
        print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
