"""Shared fixtures: paths to the golden data (HF + real CUDA kernels, H100) and error measures."""

from __future__ import annotations

import math
import os
import pathlib

# Fake 8 CPU devices for sharding tests; must be set before JAX starts. The tests compile far more than they run:
# XLA:CPU's cheaper code generation halves compile times (it changes no results: same ops, no fast-math).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")

import numpy as np
import pytest

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


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    return GOLDEN
