"""Predictions of a fine-tuned MRA for a data file (CSV, JSONL or Parquet), one JSON line per row.

    python scripts/predict.py MODEL_DIR DATA_FILE [--out predictions.jsonl] [key=value ...]

MODEL_DIR is a fine-tuning run's HF export (output_dir/hf) or one of its checkpoints (output_dir/checkpoints/N); its
config names the task and the labels, and the tokenizer.json beside it is used. The data fields (names,
max_seq_len, bucket) are the fine-tuning run's (its config.yaml); key=value overrides change them. Rows need the
input fields only; where they also carry labels, the task metrics are printed.
"""

from __future__ import annotations

import argparse
import sys

from mra_jax.training.predict import predict, run_data_config, write_predictions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a fine-tuned HF export or checkpoint directory")
    parser.add_argument("file", help="rows to predict (.csv, .jsonl, .parquet)")
    parser.add_argument("overrides", nargs="*", help="data fields, key=value")
    parser.add_argument("--out", default=None, help="predictions JSONL (default: FILE's name + .predictions.jsonl)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: the model directory's)")
    parser.add_argument("--attention", default=None, choices=["reference", "pallas", "dense"])
    args = parser.parse_args(argv)
    out = args.out or f"{args.file.rsplit('.', 1)[0]}.predictions.jsonl"
    try:
        data = run_data_config(args.model, args.overrides)
        predictions, metrics = predict(args.model, args.file, data=data, tokenizer=args.tokenizer,
                                       batch_size=args.batch_size, attention=args.attention)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_predictions(predictions, out)
    print(f"{len(predictions)} predictions -> {out}")
    if metrics is not None:
        print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
