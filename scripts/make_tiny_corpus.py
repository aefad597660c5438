"""Write the deterministic synthetic pretraining corpus (JSONL, one {"text": ...} per line).

Usage: python scripts/make_tiny_corpus.py [--out configs/data/tiny_corpus.jsonl] [--docs 900] [--seed 0]
The grammar lives in mra_jax/training/corpus.py; the defaults give the committed file (about 430 KB).
"""

from __future__ import annotations

import argparse
import json
import pathlib

from mra_jax.training.corpus import generate

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny_corpus.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument("--docs", type=int, default=900, help="number of documents")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    docs = generate(args.docs, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps({"text": doc}) + "\n" for doc in docs)
    size = args.out.stat().st_size
    words = sum(len(d.split()) for d in docs)
    print(f"wrote {len(docs)} documents, {words} words, {size / 1024:.0f} KiB to {args.out}")


if __name__ == "__main__":
    main()
