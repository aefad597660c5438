"""ListOps (Nangia & Bowman, 2018; the Long Range Arena task the MRA paper reports): nested MAX / MIN / MED / SM
(sum modulo 10) expressions over digits, e.g. ``[MAX 2 9 [MIN 4 7 ] 0 ]`` = 9; ten classes, the value.

Generated here (deterministic for a seed), never downloaded. Tokens are separated by spaces, as in LRA.
"""

from __future__ import annotations

import random
import statistics

OPERATORS = ("MAX", "MIN", "MED", "SM")


def evaluate(tokens: list[str]) -> int:
    """The value of a tokenised expression."""
    stack: list[list] = [[]]
    for token in tokens:
        if token.startswith("["):
            stack.append([token[1:]])
        elif token == "]":
            op, *args = stack.pop()
            if op == "MAX":
                value = max(args)
            elif op == "MIN":
                value = min(args)
            elif op == "MED":
                value = int(statistics.median_low(args))
            elif op == "SM":
                value = sum(args) % 10
            else:
                raise ValueError(f"unknown ListOps operator {op!r}")
            stack[-1].append(value)
        else:
            stack[-1].append(int(token))
    if len(stack) != 1 or len(stack[0]) != 1:
        raise ValueError("unbalanced ListOps expression")
    return stack[0][0]


class _TooLong(Exception):
    pass


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int, operator_p: float, out: list[str],
          limit: int) -> None:
    """Append a random expression to ``out``; give up (`_TooLong`) past ``limit`` tokens."""
    if len(out) > limit:
        raise _TooLong
    if depth > 1 and (depth >= max_depth or rng.random() >= operator_p):
        out.append(str(rng.randrange(10)))
        return
    out.append(f"[{rng.choice(OPERATORS)}")
    for _ in range(rng.randint(2, max_args)):
        _tree(rng, depth + 1, max_depth, max_args, operator_p, out, limit)
    out.append("]")


def generate(num: int, seed: int = 0, *, min_len: int = 1, max_len: int = 2000, max_depth: int = 10,
             max_args: int = 10, operator_p: float = 0.25) -> list[dict]:
    """``num`` examples ``{"text", "label"}`` whose token counts lie in ``[min_len, max_len]``: below the root, a node
    is an operator with probability ``operator_p`` (with 2..``max_args`` arguments) and a digit otherwise; trees
    outside the length range are rejected (LRA's recipe)."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    rng = random.Random(seed)
    out = []
    while len(out) < num:
        tokens: list[str] = []
        try:
            _tree(rng, 1, max_depth, max_args, operator_p, tokens, max_len)
        except _TooLong:
            continue
        if min_len <= len(tokens) <= max_len:
            out.append({"text": " ".join(tokens), "label": evaluate(tokens)})
    return out
