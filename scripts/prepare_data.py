"""Tokenize a pretraining corpus once into a token store (memory-mapped shards) that scripts/pretrain.py reads.

    python scripts/prepare_data.py INPUT... --out DIR [--tokenizer tokenizer.json | --vocab-size N]
        [--text-field F] [--eval-fraction X] [--seed S] [--workers N] [--force]

INPUT: .txt (a document per non-empty line), .jsonl and .parquet files (the --text-field of each record / row), or
directories written by HF datasets' save_to_disk. Without --tokenizer a byte-level BPE of --vocab-size ids is
trained on a bounded sample of the documents. DIR is written aside and moved into place complete; an interrupted
preparation started again reuses the units it finished. Then: python scripts/pretrain.py CONFIG data.prepared=DIR
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mra_jax.training import store
from mra_jax.training.data import load_tokenizer, train_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt, .jsonl, .parquet or a datasets directory")
    parser.add_argument("--out", required=True, help="the store directory to write")
    parser.add_argument("--tokenizer", help="a tokenizer.json (default: train a byte-level BPE)")
    parser.add_argument("--vocab-size", type=int, default=32000, help="ids of a trained tokenizer (default 32000)")
    parser.add_argument("--tokenizer-sample-mb", type=float, default=store.TOKENIZER_SAMPLE_BYTES / 2**20,
                        help="text to train the tokenizer on, taken evenly from all inputs (default 64)")
    parser.add_argument("--text-field", default="text", help="the text's field in .jsonl / .parquet / datasets")
    parser.add_argument("--eval-fraction", type=float, default=0.01,
                        help="share of documents held out for eval, chosen by a seeded hash (default 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="the eval split's hash key (default 0)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizing processes (default: the CPU count)")
    parser.add_argument("--unit-mb", type=float, default=store.UNIT_BYTES / 2**20,
                        help="input read by one worker at a time, one shard per split (default 64)")
    parser.add_argument("--force", action="store_true", help="replace DIR if it is a token store")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.workers < 1 or args.unit_mb <= 0 or args.tokenizer_sample_mb <= 0:
            raise ValueError("--workers, --unit-mb and --tokenizer-sample-mb must be positive")
        if not 0.0 <= args.eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction={args.eval_fraction} must be in [0, 1)")
        store.check_output(args.out, args.force)  # before a tokenizer is trained
        unit_bytes = max(1, int(args.unit_mb * 2**20))
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
        else:
            units = store.plan_units(args.inputs, args.text_field, unit_bytes=unit_bytes)
            print(f"training a byte-level BPE of {args.vocab_size} ids on up to {args.tokenizer_sample_mb:g} MB of "
                  "documents", file=sys.stderr)
            tokenizer = train_tokenizer(store.sample_documents(units, args.text_field,
                                                               int(args.tokenizer_sample_mb * 2**20)),
                                        args.vocab_size)
        meta = store.prepare_store(args.inputs, args.out, tokenizer, text_field=args.text_field,
                                   eval_fraction=args.eval_fraction, seed=args.seed, workers=args.workers,
                                   unit_bytes=unit_bytes, force=args.force, progress=not args.no_progress,
                                   log=lambda m: print(m, file=sys.stderr))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: started again, the preparation reuses the units it finished", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - start
    train, evals = meta["splits"]["train"], meta["splits"]["eval"]
    tokens = train["tokens"] + evals["tokens"]
    print(args.out)
    print(f"{train['documents']:,} train / {evals['documents']:,} eval documents, {train['tokens']:,} / "
          f"{evals['tokens']:,} tokens ({meta['dtype']}, vocabulary {meta['vocab_size']}) in {elapsed:.1f} s: "
          f"{tokens / elapsed:,.0f} tokens/s with {args.workers} worker(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
