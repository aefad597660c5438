"""The demo's long-range task: which of two symbols fills more of a sequence of 1-2k tokens.

A sequence is made of runs: each run repeats one symbol (``a`` or ``b``, drawn at random) 32-96 times, and the
label is the symbol that occurs more often over the whole sequence (sequences whose two counts differ by less than
``min_margin`` of their length are not drawn). Only the whole input decides it: the first 512 tokens agree with the
whole about 72% of the time at 1-2k tokens (`prefix_majority_accuracy`), so a model that reads 512 tokens cannot do
much better, while one that reads everything can score near 100%.

Generated here (deterministic for a seed), never downloaded. Symbols are separated by spaces (one token each).
"""

from __future__ import annotations

import random

SYMBOLS = ("a", "b")


def majority(symbols: list[str]) -> str:
    """The symbol of ``SYMBOLS`` that occurs more often in ``symbols`` (the first one on a tie)."""
    counts = [symbols.count(s) for s in SYMBOLS]
    return SYMBOLS[counts.index(max(counts))]


def generate(num: int, seed: int = 0, *, min_len: int = 1000, max_len: int = 2000, min_run: int = 32,
             max_run: int = 96, min_margin: float = 0.02) -> list[dict]:
    """``num`` examples ``{"text", "label"}`` of ``min_len``-``max_len`` symbols."""
    if not 1 <= min_len <= max_len or not 1 <= min_run <= max_run or not 0 <= min_margin < 1:
        raise ValueError(f"need 1 <= min_len <= max_len, 1 <= min_run <= max_run and 0 <= min_margin < 1, got "
                         f"{min_len}, {max_len}, {min_run}, {max_run}, {min_margin}")
    rng = random.Random(seed)
    out = []
    while len(out) < num:
        length = rng.randint(min_len, max_len)
        symbols: list[str] = []
        while len(symbols) < length:
            symbols += [rng.choice(SYMBOLS)] * rng.randint(min_run, max_run)
        symbols = symbols[:length]
        if abs(symbols.count(SYMBOLS[0]) * 2 - length) >= min_margin * length:
            out.append({"text": " ".join(symbols), "label": majority(symbols)})
    return out


def prefix_majority_accuracy(rows: list[dict], symbols: int) -> float:
    """How often the majority of the first ``symbols`` symbols of a row is its label: what reading only that much
    scores by the rule that defines the label."""
    return sum(majority(r["text"].split()[:symbols]) == r["label"] for r in rows) / len(rows)
