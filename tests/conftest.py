"""Shared fixtures and the environment of every test (8 fake CPU devices); helpers live in helpers.py."""

from __future__ import annotations

import os
import pathlib

# Fake 8 CPU devices for sharding tests; must be set before JAX starts. The tests compile far more than they run:
# XLA:CPU's cheaper code generation halves compile times (it changes no results: same ops, no fast-math).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")

import pytest
from helpers import GOLDEN


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    return GOLDEN
