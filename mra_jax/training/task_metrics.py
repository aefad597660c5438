"""Decoding of fine-tuning predictions and their metrics (scikit-learn, scipy, seqeval), on host numpy arrays.

Inputs are for the real examples only, in feature order: drop the filler rows of ``tasks.eval_batches`` first
(``real_rows(x, weight)``). Per-token logits may be one array ``[N, L, ...]`` padded to any ``L`` at least as long
as every feature, or a list of per-feature arrays (batches padded to different lengths need not be re-padded).
"""

from __future__ import annotations

import collections
import re
import string
import warnings
from collections.abc import Sequence

import numpy as np

from mra_jax.training.tasks import Encoded

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def real_rows(values: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The rows of ``values`` whose ``weight`` is positive (drops ``eval_batches``' fillers)."""
    weight = np.asarray(weight).reshape(-1)
    values = np.asarray(values)
    if len(values) != len(weight):
        raise ValueError(f"{len(values)} rows but {len(weight)} weights")
    return values[weight > 0]


def _per_feature(x, n: int, what: str) -> list[np.ndarray]:
    if not isinstance(x, list | tuple):
        x = np.asarray(x)  # one padded array (numpy or jax)
        x = [x[i] for i in range(x.shape[0])]
    rows = list(x)
    if len(rows) != n:
        raise ValueError(f"{what}: {len(rows)} rows for {n} features (drop the eval fillers with real_rows first)")
    return [np.asarray(r) for r in rows]


# --------------------------------------------------------------------------------------------------- sequence cls


def sequence_classification_metrics(logits: np.ndarray, labels: np.ndarray, problem_type: str) -> dict[str, float]:
    """Metrics of sequence classification.

    - ``single_label_classification``: logits ``[N, C]``, int labels ``[N]``: ``accuracy``, ``macro_f1`` (over
      the classes present in labels or predictions), and ``mcc`` (Matthews correlation) when ``C == 2``.
    - ``regression``: predictions ``[N]`` or ``[N, 1]``, float labels ``[N]``: ``mse``, ``pearson``, ``spearman``
      (NaN when either side is constant).
    - ``multi_label_classification``: logits ``[N, C]``, multi-hot labels ``[N, C]``; predicted positive where
      ``sigmoid(logit) > 0.5``: ``micro_f1``, ``macro_f1`` (over all C labels), ``exact_match`` (all C right).
    """
    from sklearn.metrics import f1_score, matthews_corrcoef

    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
    if problem_type == "single_label_classification":
        if logits.ndim != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(f"expected logits [N, C] and labels [N], got {logits.shape} and {labels.shape}")
        pred = logits.argmax(-1)
        out = {"accuracy": float(np.mean(pred == labels)),
               "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0))}
        if logits.shape[-1] == 2:
            out["mcc"] = float(matthews_corrcoef(labels, pred))
        return out
    if problem_type == "regression":
        from scipy import stats

        pred = logits.reshape(len(logits), -1)
        if pred.shape[1] != 1 or labels.reshape(-1).shape != (len(pred),):
            raise ValueError(f"expected predictions [N] or [N, 1] and labels [N], got {logits.shape} and "
                             f"{labels.shape}")
        pred, y = pred[:, 0], labels.reshape(-1).astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant input: NaN, as scipy returns
            pearson = float(stats.pearsonr(pred, y)[0]) if len(y) > 1 else float("nan")
            spearman = float(stats.spearmanr(pred, y)[0]) if len(y) > 1 else float("nan")
        return {"mse": float(np.mean((pred - y) ** 2)), "pearson": pearson, "spearman": spearman}
    if problem_type == "multi_label_classification":
        if logits.ndim != 2 or labels.shape != logits.shape:
            raise ValueError(f"expected logits and multi-hot labels [N, C], got {logits.shape} and {labels.shape}")
        pred, y = (logits > 0).astype(np.int64), (labels > 0.5).astype(np.int64)
        return {"micro_f1": float(f1_score(y, pred, average="micro", zero_division=0)),
                "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
                "exact_match": float(np.mean(np.all(pred == y, axis=1)))}
    raise ValueError(f"unknown problem_type {problem_type!r}")


# --------------------------------------------------------------------------------------------------- token cls


def token_classification_predictions(logits, encoded: Encoded) -> list[list[str]]:
    """Per example, the predicted label name of every word: the argmax at the word's first sub-token; "O" for a
    word that truncation removed (or that has no token)."""
    rows = _per_feature(logits, len(encoded.features), "token logits")
    out = []
    for row, ex in zip(rows, encoded.examples, strict=True):
        starts = ex["word_starts"]
        if row.ndim != 2 or row.shape[0] < len(ex["word_ids"]):
            raise ValueError(f"token logits of shape {row.shape} for a feature of {len(ex['word_ids'])} tokens")
        pred = np.full(len(starts), -1, np.int64)
        kept = starts >= 0
        pred[kept] = row[starts[kept]].argmax(-1)
        out.append([encoded.label_names[p] if p >= 0 else "O" for p in pred])
    return out


def token_classification_metrics(logits, encoded: Encoded) -> dict[str, float]:
    """Entity-level ``precision``, ``recall``, ``f1`` (seqeval, CoNLL style, micro over entity types) and word-level
    ``accuracy``, against every word of the gold tags (truncated words count as predicted "O")."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    pred = token_classification_predictions(logits, encoded)
    gold = [list(ex["tags"]) for ex in encoded.examples]
    return {"precision": float(precision_score(gold, pred, zero_division=0)),
            "recall": float(recall_score(gold, pred, zero_division=0)),
            "f1": float(f1_score(gold, pred, zero_division=0)),
            "accuracy": float(accuracy_score(gold, pred))}


# --------------------------------------------------------------------------------------------------- QA


def question_answering_predictions(start_logits, end_logits, encoded: Encoded, max_answer_len: int = 30,
                                   n_best: int = 20) -> dict[str, str]:
    """The answer text of every example (id -> text): the best-scoring span (start logit + end logit) over all of
    its windows, among the ``n_best`` best start and ``n_best`` best end context tokens of each window, with
    ``start <= end``, at most ``max_answer_len`` tokens and a non-empty text. "" if no window has such a span.
    """
    n = len(encoded.features)
    starts, ends = _per_feature(start_logits, n, "start logits"), _per_feature(end_logits, n, "end logits")
    out = {}
    for ex in encoded.examples:
        best, text = -np.inf, ""
        for f, off in zip(ex["features"], ex["offsets"], strict=True):
            s_log, e_log = starts[f].reshape(-1), ends[f].reshape(-1)
            if len(s_log) < len(off) or len(e_log) < len(off):
                raise ValueError(f"QA logits of length {len(s_log)}/{len(e_log)} for a window of {len(off)} tokens")
            ctx = np.flatnonzero(off[:, 1] > off[:, 0])  # context tokens with non-empty text
            if not len(ctx):
                continue
            s_idx = ctx[np.argsort(-s_log[ctx], kind="stable")[:n_best]]
            e_idx = ctx[np.argsort(-e_log[ctx], kind="stable")[:n_best]]
            score = s_log[s_idx][:, None] + e_log[e_idx][None, :]
            span = e_idx[None, :] - s_idx[:, None]
            valid = (span >= 0) & (span < max_answer_len)
            if not valid.any():
                continue
            score = np.where(valid, score, -np.inf)
            i, j = np.unravel_index(np.argmax(score), score.shape)
            if score[i, j] > best:
                best = score[i, j]
                text = ex["context"][off[s_idx[i], 0] : off[e_idx[j], 1]]
        out[ex["id"]] = text
    return out


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def question_answering_metrics(predictions: dict[str, str], encoded: Encoded) -> dict[str, float]:
    """SQuAD ``exact_match`` and ``f1`` as fractions in [0, 1] (not percent): per example the max over its gold
    answers of the normalised exact match and token F1, averaged over the examples. An example without gold answers
    (SQuAD 2.0 unanswerable) has the gold answer ""; an example missing from ``predictions`` scores 0."""
    if not encoded.examples:
        raise ValueError("no examples")
    em = f1 = 0.0
    for ex in encoded.examples:
        if ex["id"] not in predictions:
            continue
        pred = predictions[ex["id"]]
        golds = list(ex["answers"]) or [""]
        em += max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
        f1 += max(_f1(pred, g) for g in golds)
    n = len(encoded.examples)
    return {"exact_match": em / n, "f1": f1 / n}


# --------------------------------------------------------------------------------------------------- multiple choice


def multiple_choice_metrics(logits: np.ndarray, labels: np.ndarray | Sequence[int]) -> dict[str, float]:
    """``accuracy`` of the argmax over choices (logits ``[N, num_choices]``, labels ``[N]``)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, num_choices] and labels [N], got {logits.shape} and {labels.shape}")
    return {"accuracy": float(np.mean(logits.argmax(-1) == labels))}


def metric_names(task: str, problem_type: str | None = None, num_labels: int | None = None) -> tuple[str, ...]:
    """The metrics the evaluation of ``task`` reports (each also as ``eval_<name>``), besides ``loss``; the first is
    the task's default for choosing the best checkpoint."""
    if task == "sequence_classification":
        if problem_type == "regression":
            return ("mse", "pearson", "spearman")
        if problem_type == "multi_label_classification":
            return ("micro_f1", "macro_f1", "exact_match")
        return ("accuracy", "macro_f1", "mcc") if num_labels == 2 else ("accuracy", "macro_f1")
    return {"token_classification": ("f1", "precision", "recall", "accuracy"),
            "question_answering": ("f1", "exact_match"), "multiple_choice": ("accuracy",)}[task]

