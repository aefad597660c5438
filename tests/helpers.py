"""Test helpers: where the golden data lives (HF + real CUDA kernels, H100), the model cases, error measures."""

from __future__ import annotations

import math
import pathlib

import numpy as np

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "golden"
MODEL_CASES = ("model_base", "model_masked_lm", "model_sequence_classification", "model_multiple_choice",
               "model_token_classification", "model_question_answering")


def rel_err(got, ref) -> float:
    """Max-abs error over max-abs reference value."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def worst(errors) -> float:
    """The largest error, or inf if any is NaN or infinite (Python's ``max`` skips a NaN that is not first)."""
    errors = [float(e) for e in errors]
    return math.inf if not all(math.isfinite(e) for e in errors) else max(errors, default=0.0)
