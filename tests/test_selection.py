"""``pallas_kernels.selection.topk_indices`` selects exactly ``lax.top_k``'s index set (CPU, both methods).

Inputs stress ties (few distinct values, all-equal rows, -1e4 penalties, +5000/+10000 prior bonuses), signed zeros,
infinities and NaNs; ``"sampled"`` is also run past its fast path (adversarial sample -> exact fallback).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

from pallas_kernels import selection
from pallas_kernels.selection import topk_indices, topk_selection

METHODS = ("radix", "sampled", "radix_gpu")


@functools.cache
def _jitted(k: int, method: str):
    return jax.jit(functools.partial(topk_indices, k=k, method=method, interpret=method == "radix_gpu"))


@functools.cache
def _fast_path_ok(n: int, k: int):
    """Per-row flag: did ``"sampled"`` settle the threshold without the fallback?"""

    def fn(x):
        keys = selection._keys(x)
        return selection._sampled_threshold(keys, jnp.asarray(selection._valid_words(n)), n, k)[2]

    return jax.jit(fn)


def _reference(x, k: int) -> np.ndarray:
    return np.sort(np.asarray(lax.top_k(jnp.asarray(x), k)[1]), axis=-1)


def _check(x, k: int, method: str) -> None:
    x = np.asarray(x, np.float32)
    got = _jitted(k, method)(jnp.asarray(x))
    assert got.dtype == jnp.int32
    assert got.shape == (*x.shape[:-1], k)
    np.testing.assert_array_equal(np.asarray(got), _reference(x, k))


def _tie_heavy_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Eight rows of awkward patterns, ``[8, n]`` float32."""
    normal = rng.standard_normal(n)
    band = np.abs(np.arange(n) % 16 - np.arange(n) // 16 % 16) <= 1  # a diagonal-ish band on a 16-wide grid
    prior = normal + 5000.0 * band + 5000.0 * (np.arange(n) < 5) + 5000.0 * (np.arange(n) % 16 < 2)
    rows = [
        normal,
        rng.integers(-2, 3, n).astype(np.float64),  # five distinct values
        np.full(n, 3.0),  # all equal
        np.where(rng.random(n) < 0.5, -0.0, 0.0),  # signed zeros only
        np.where(rng.random(n) < 0.5, -1e4, np.round(normal * 2) / 2),  # penalties + coarse ties
        np.where(rng.random(n) < 0.2, -1e4, prior),  # prior bonuses (5000, 10000, 15000) + penalties
        rng.choice(np.array([np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0, 1.0, -1.0]), n),
        np.round(normal * 4) / 4,  # quantised
    ]
    return np.stack(rows).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# small rows: every pattern, a sweep of k


@pytest.mark.parametrize("k", [1, 2, 3, 17, 32, 36])
def test_radix_small_rows_sweep_k(k):
    _check(_tie_heavy_rows(np.random.default_rng(k), 37), k, "radix")


@pytest.mark.parametrize("k", [1, 17, 36])
def test_sampled_small_rows_sweep_k(k):
    _check(_tie_heavy_rows(np.random.default_rng(100 + k), 37), k, "sampled")


@pytest.mark.parametrize("method", METHODS)
def test_k_equals_n(method):
    x = _tie_heavy_rows(np.random.default_rng(0), 37)
    _check(x, 37, method)


@pytest.mark.parametrize(("n", "k"), [(37, 5), (600, 100), (1030, 1029)])
def test_radix_gpu_kernel_returns_the_same_indices_and_bits(n, k):
    """The GPU kernel's own compaction (indices and packed bits written in its last pass) equals the XLA one."""
    x = jnp.asarray(_tie_heavy_rows(np.random.default_rng(n), n))
    want = jax.jit(functools.partial(topk_selection, k=k, method="radix"))(x)
    got = jax.jit(functools.partial(topk_selection, k=k, method="radix_gpu", interpret=True))(x)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(("n", "k"), [(2600, 700), (2048, 2047)])
def test_chunked_radix_gpu_kernels_return_the_same_indices_and_bits(monkeypatch, n, k):
    """Rows longer than one program's (here 1024 entries, so 2 or 4 chunks with padding) go through the chunked
    kernels: the radix state rebuilt from every chunk's counts, ties split across chunks by lowest index."""
    from pallas_kernels import selection

    monkeypatch.setattr(selection, "_GPU_RADIX_MAX_N", 1024)
    test_radix_gpu_kernel_returns_the_same_indices_and_bits(n, k)


def test_signed_zero_order():
    """``-0.0 < +0.0`` as in lax.top_k (total order); equal zeros resolve by index."""
    x = np.array([[0.0, -0.0, 0.0, -0.0, 1.0, -1.0], [-0.0, 0.0, -0.0, 0.0, -0.0, 0.0]], np.float32)
    got = np.asarray(_jitted(3, "radix")(jnp.asarray(x)))
    np.testing.assert_array_equal(got, [[0, 2, 4], [1, 3, 5]])
    np.testing.assert_array_equal(got, _reference(x, 3))


@pytest.mark.parametrize("method", METHODS)
def test_leading_dims(method):
    rng = np.random.default_rng(1)
    x = np.stack([_tie_heavy_rows(rng, 1000)[:3], _tie_heavy_rows(rng, 1000)[4:7]])  # [2, 3, 1000]
    _check(x, 100, method)


def test_vmap():
    x = _tie_heavy_rows(np.random.default_rng(2), 300).reshape(2, 4, 300)
    got = jax.jit(jax.vmap(functools.partial(topk_indices, k=60, method="sampled")))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got), _reference(x, 60))


def test_auto_method():
    _check(_tie_heavy_rows(np.random.default_rng(3), 64), 9, "auto")
    from pallas_kernels.selection import auto_method

    assert auto_method((12, 1 << 22)) == "sampled" and auto_method((4, 1000)) == "radix"
    assert auto_method((12, 1 << 22), gpu_kernel=True) == auto_method((4, 1000), gpu_kernel=True) == "radix_gpu"


def test_bad_arguments():
    x = jnp.zeros((2, 10), jnp.float32)
    for k in (0, 11):
        with pytest.raises(ValueError):
            topk_indices(x, k)
    with pytest.raises(TypeError):
        topk_indices(x.astype(jnp.bfloat16), 3)
    with pytest.raises(ValueError):
        topk_indices(x, 3, method="heap")


# ----------------------------------------------------------------------------------------------------------------------
# random tie-heavy rows (hypothesis)

_PALETTE = np.array([-1e4, -1e4 + 5000.0, -1.0, -0.0, 0.0, 0.5, 1.0, 5000.0, 5000.5, 10000.0, 15000.0], np.float32)


@pytest.mark.slow
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    codes=st.lists(st.integers(0, len(_PALETTE) - 1), min_size=4 * 300, max_size=4 * 300),
    noise=st.sampled_from([0.0, 1e-3]),
    k=st.sampled_from([1, 60, 299]),
    method=st.sampled_from(METHODS),
)
def test_random_palette_rows(codes, noise, k, method):
    x = _PALETTE[np.asarray(codes)].reshape(4, 300)
    if noise:  # break a share of the ties, keep the rest
        x = x + np.float32(noise) * (np.arange(4 * 300).reshape(4, 300) % 7 == 0)
    _check(x, k, method)


# ----------------------------------------------------------------------------------------------------------------------
# rows longer than the sample: the sampled fast path, and its fallback

N_LARGE = 65536  # a 256 x 256 block grid
K_LARGE = N_LARGE // 16


def _block_score_rows(rng: np.random.Generator) -> np.ndarray:
    """Four ``[N_LARGE]`` rows shaped like MRA block scores, ``[4, N_LARGE]`` float32."""
    n = 256
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    scores = rng.standard_normal((n, n)).astype(np.float32)
    prior = scores + 5000.0 * (np.abs(i - j) <= 2) + 5000.0 * (i < 2) + 5000.0 * (j < 2)
    padded = np.where((i >= 216) | (j >= 216), np.float32(-1e4), prior)  # masked blocks all tie at -1e4 (+5000)
    mostly_masked = np.where(rng.random((n, n)) < 0.96, np.float32(-1e4), scores)  # T falls in the -1e4 tie
    quantised = np.round(scores * 100) / 100
    return np.stack([scores, padded, mostly_masked, quantised]).reshape(4, -1).astype(np.float32)


def test_sampled_large_rows_fast_path():
    x = _block_score_rows(np.random.default_rng(4))
    assert bool(np.all(np.asarray(_fast_path_ok(N_LARGE, K_LARGE)(jnp.asarray(x)))))
    _check(x, K_LARGE, "sampled")
    _check(x, K_LARGE, "radix")


def test_sampled_large_rows_fallback():
    """A sample that misrepresents the row defeats the fast path; the result stays exact."""
    x = _block_score_rows(np.random.default_rng(5))
    x[:, selection._sample_indices(N_LARGE)] = -1e6
    assert not np.any(np.asarray(_fast_path_ok(N_LARGE, K_LARGE)(jnp.asarray(x))))
    _check(x, K_LARGE, "sampled")


@pytest.mark.parametrize("k", [1, N_LARGE - 1])
def test_sampled_large_rows_extreme_k(k):
    _check(_block_score_rows(np.random.default_rng(6)), k, "sampled")


# --------------------------------------------------------------------------------------------- priors and selection


def test_add_priors_bonuses_by_hand():
    from mra_jax.attention.selection import add_priors

    zero = jnp.zeros((4, 4), jnp.float32)
    b = 5000.0
    diagonal = np.diag([b] * 4)  # diagonal_n_blocks 1: |i - j| <= 0
    np.testing.assert_array_equal(np.asarray(add_priors(zero, 0, 1)), diagonal)
    band = np.array([[b, b, 0, 0], [b, b, b, 0], [0, b, b, b], [0, 0, b, b]])  # 3: |i - j| <= 1
    np.testing.assert_array_equal(np.asarray(add_priors(zero, 0, 3)), band)
    first = np.zeros((4, 4))
    first[0, :] += b
    first[:, 0] += b  # the corner gets both
    np.testing.assert_array_equal(np.asarray(add_priors(zero, 1, 0)), first)
    np.testing.assert_array_equal(np.asarray(add_priors(zero, 1, 1)), first + diagonal)

@pytest.mark.slow

def test_select_blocks_takes_priors_first_and_breaks_ties_by_lowest_index():
    from mra_jax.attention.selection import select_blocks

    def indices(*args, **kwargs):
        return np.asarray(select_blocks(*args, **kwargs)[0])

    zero = jnp.zeros((4, 4), jnp.float32)
    np.testing.assert_array_equal(indices(zero, 3), [0, 1, 2])  # all tied: lowest flat indices
    # first_n 1: the corner (10000), then the 5000s of row 0 and column 0 (1, 2, 3, 4, 8, 12) by index.
    np.testing.assert_array_equal(indices(zero, 5, first_n_blocks=1), [0, 1, 2, 3, 4])
    # the priors beat any plausible score: a large score elsewhere comes after them
    scores = zero.at[3, 2].set(100.0)
    np.testing.assert_array_equal(indices(scores, 5, diagonal_n_blocks=1), [0, 5, 10, 14, 15])
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 6, 6)).astype(np.float32)
    want = np.sort(np.argsort(-s.reshape(2, 36), axis=-1, kind="stable")[:, :7], axis=-1)
    np.testing.assert_array_equal(indices(jnp.asarray(s), 7), want)


@pytest.mark.parametrize(("n", "k"), [(6, 7), (6, 36), (9, 20), (3, 1)])
def test_selected_pair_mask_from_the_bits_is_the_set_of_the_indices(n, k):
    """The packed bits that the selection returns unpack to exactly its indices (also past a word boundary, for a
    partial last word and for k = n * n)."""
    from mra_jax.attention.selection import select_blocks, selected_pair_mask

    s = jnp.asarray(np.random.default_rng(n * k).normal(size=(2, 3, n, n)).astype(np.float32))
    idx, bits = select_blocks(s, k)
    assert bits.dtype == jnp.uint32 and bits.shape == (2, 3, -(-n * n // 32))
    mask = np.asarray(selected_pair_mask(bits, n)).reshape(2, 3, n * n)
    want = np.zeros((2, 3, n * n), np.float32)
    np.put_along_axis(want, np.asarray(idx), 1.0, axis=-1)
    np.testing.assert_array_equal(mask, want)
