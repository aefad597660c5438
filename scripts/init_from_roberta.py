"""Initialise a long-context MRA masked LM (HF format) from an HF RoBERTa-architecture masked LM.

Usage: python scripts/init_from_roberta.py --hf-dir ROBERTA_DIR --out OUT --max-position-embeddings 4096
       [--block-per-row 8] [--approx-mode full] [--initial-prior-first-n-blocks 0]
       [--initial-prior-diagonal-n-blocks 0] [--force]

OUT gets config.json (MraForMaskedLM), model.safetensors and ROBERTA_DIR's tokenizer (tokenizer.json, built from
vocab.json + merges.txt where it has only those), written aside and moved into place only when complete; pretraining
from OUT uses that tokenizer.
The encoder and MLM head are renamed; RoBERTa's learned position rows are tiled to the new length (the Longformer /
mra-base-4096 recipe). Tensors are read one at a time (safetensors, sharded safetensors or pytorch_model.bin).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mra_jax.atomic import check_output_dir
from mra_jax.conversion.roberta import mra_from_roberta
from mra_jax.progress import ProgressBar


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True, help="HF RoBERTa masked-LM directory (config.json + weights)")
    parser.add_argument("--out", required=True, help="output directory for the HF MRA checkpoint")
    parser.add_argument("--max-position-embeddings", type=int, default=4096,
                        help="new maximum sequence length (a multiple of 32)")
    parser.add_argument("--block-per-row", type=int, default=8, help="high-resolution block pairs per block row")
    parser.add_argument("--approx-mode", choices=("full", "sparse"), default="full", help="MRA approximation mode")
    parser.add_argument("--initial-prior-first-n-blocks", type=int, default=0, help="prior: first n block rows/cols")
    parser.add_argument("--initial-prior-diagonal-n-blocks", type=int, default=0, help="prior: n diagonal blocks")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        check_output_dir(args.out, args.force)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        config = mra_from_roberta(args.hf_dir, args.out, max_position_embeddings=args.max_position_embeddings,
                                  block_per_row=args.block_per_row, approx_mode=args.approx_mode,
                                  initial_prior_first_n_blocks=args.initial_prior_first_n_blocks,
                                  initial_prior_diagonal_n_blocks=args.initial_prior_diagonal_n_blocks,
                                  force=args.force, progress=ProgressBar("converting"))
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not os.path.isfile(os.path.join(args.out, "tokenizer.json")):
        print(f"note: {args.hf_dir} has no tokenizer (tokenizer.json, or vocab.json + merges.txt); pretraining from "
              f"{args.out} needs data.tokenizer= the tokenizer its ids come from", file=sys.stderr)
    print(args.out)
    print(f"wrote MraForMaskedLM ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.max_position_embeddings} positions, block_per_row {config.block_per_row}, "
          f"{config.approx_mode}) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
