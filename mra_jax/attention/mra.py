"""`mra_attention`: MRA-2 attention in four stages (low resolution, selection, high resolution, combination)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mra_jax.attention.combination import low_resolution_output
from mra_jax.attention.low_resolution import EPS, block_sums, selection_scores, token_counts
from mra_jax.attention.selection import select_blocks
from mra_jax.configuration import APPROX_MODES, BLOCK_SIZE
from pallas_kernels import build_block_layout, merged_attention

IMPLEMENTATIONS = (None, "reference", "pallas", "pallas_gpu", "pallas_tpu")


def _check_inputs(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None,
                  approx_mode: str, implementation: str | None, first_n: int, diagonal_n: int) -> None:
    if query.ndim != 4:
        raise ValueError(f"query must be [batch, seq, heads, head_dim], got shape {query.shape}")
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(f"query, key and value must have the same shape, got {query.shape}, {key.shape}, "
                         f"{value.shape}")
    if query.shape[1] < 1:
        raise ValueError("the sequence is empty (seq = 0)")
    if mask is not None and mask.shape != query.shape[:2]:
        raise ValueError(f"mask must be [batch, seq] = {query.shape[:2]}, got shape {mask.shape}")
    if mask is not None and not (jnp.issubdtype(mask.dtype, jnp.number) or mask.dtype == jnp.bool_):
        raise ValueError(f"mask must be numeric or boolean (1 = token, 0 = padding), got {mask.dtype}")
    if approx_mode not in APPROX_MODES:
        raise ValueError(f"approx_mode must be one of {APPROX_MODES}, got {approx_mode!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if first_n < 0 or diagonal_n < 0:
        raise ValueError(f"prior block counts must be non-negative, got {first_n}, {diagonal_n}")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating array, got {x.dtype}")


def token_mask(mask: jax.Array) -> jax.Array:
    """An attention mask as int32 1 (token) / 0 (padding): truncated as HF's ``.int()`` (fractions below 1 are
    padding), then any value of 1 or more is a token (2 or 3 would otherwise scale the keys and values)."""
    return jnp.clip(jax.lax.stop_gradient(mask).astype(jnp.int32), 0, 1)


def mra_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None, *,
                  num_blocks: int, approx_mode: str = "full", initial_prior_first_n_blocks: int = 0,
                  initial_prior_diagonal_n_blocks: int = 0, implementation: str | None = None,
                  platform: str | None = None) -> jax.Array:
    """MRA-2 attention (HF's ``mra2_attention`` semantics, with its bugs fixed).

    Args:
      query, key, value: ``[batch, seq, heads, head_dim]`` (``jax.nn.dot_product_attention`` layout), float32 or
        bfloat16; statistics are kept in float32.
      mask: ``[batch, seq]`` with 1 = token, 0 = padding (values are truncated to integers, as HF's ``.int()``),
        or ``None`` for no padding.
      num_blocks: budget of high-resolution 32x32 block pairs per (batch, head); capped at the ``n * n`` pairs
        that exist (``n = ceil(seq / 32)``).
      approx_mode: ``"full"`` (high resolution on the selected pairs, low resolution elsewhere) or ``"sparse"``
        (selected pairs only).
      initial_prior_first_n_blocks, initial_prior_diagonal_n_blocks: HF's priors forcing pairs into the selection.
      implementation: ``None`` (best for the backend: the Pallas kernels on GPU and TPU, the jnp reference on CPU),
        ``"reference"`` (jnp gathers and segment sums), ``"pallas"`` (the platform's kernels: the TPU ones on a TPU,
        else the GPU ones; interpret mode on CPU), or a kernel family named explicitly: ``"pallas_gpu"`` /
        ``"pallas_tpu"`` (interpret mode on CPU, e.g. to test the TPU kernels there). The TPU kernels are checked
        in interpret mode and by libtpu's deviceless compile, not yet on TPU hardware.
      platform: the platform whose kernels to choose (``"gpu"``, ``"tpu"``, ``"cpu"``); ``None`` =
        ``jax.default_backend()``. Set it when compiling ahead of time for another platform.

    Any ``seq >= 1`` works: it is padded to a multiple of 32 with masked positions and sliced back. Any head_dim
    works, with scale ``1 / sqrt(head_dim)``. Returns ``[batch, seq, heads, head_dim]`` in the input dtype, zero at
    padded queries.
    """
    _check_inputs(query, key, value, mask, approx_mode, implementation, initial_prior_first_n_blocks,
                  initial_prior_diagonal_n_blocks)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int | np.integer) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
    backend = jax.default_backend() if platform is None else platform
    if implementation is None:
        implementation = "pallas" if backend in ("gpu", "tpu") else "reference"
    if implementation == "pallas":
        implementation = "pallas_tpu" if backend == "tpu" else "pallas_gpu"
    n = -(-query.shape[1] // BLOCK_SIZE)
    return _mra_attention(query, key, value, mask, num_blocks=min(int(num_blocks), n * n), full=approx_mode == "full",
                          first_n=int(initial_prior_first_n_blocks), diagonal_n=int(initial_prior_diagonal_n_blocks),
                          implementation=implementation,  # kernels of another platform run interpreted
                          interpret=implementation != "reference" and backend != implementation.removeprefix("pallas_"))


@functools.partial(jax.jit, static_argnames=("num_blocks", "full", "first_n", "diagonal_n", "implementation",
                                             "interpret"))
def _mra_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None, *, num_blocks: int,
                   full: bool, first_n: int, diagonal_n: int, implementation: str, interpret: bool) -> jax.Array:
    """`mra_attention` on checked arguments, jitted (one compiled program for an eager call instead of hundreds of
    small ones; inlined under an outer ``jax.jit``). Everything stays in the callers' ``[B, S, H, d]`` layout."""
    batch, seq, heads, head_dim = query.shape
    n = -(-seq // BLOCK_SIZE)
    tokens = None if mask is None else token_mask(mask)
    if n * BLOCK_SIZE != seq:  # pad to whole blocks with masked positions
        pad = n * BLOCK_SIZE - seq
        tokens = jnp.pad(jnp.ones((batch, seq), jnp.int32) if tokens is None else tokens, ((0, 0), (0, pad)))
        query, key, value = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (query, key, value))
    mask_f = None if tokens is None else tokens.astype(jnp.float32)

    scale = math.sqrt(head_dim)
    count = None if mask_f is None else token_counts(mask_f, batch, n)  # None: 32 tokens in every block
    sums = tuple(block_sums(x, mask_f) for x in ((query, key, value) if full else (query, key)))
    gpu = implementation == "pallas_gpu"
    scores = selection_scores(*sums[:2], count, scale, gpu_kernel=gpu, interpret=interpret)
    indices, bits = select_blocks(scores, num_blocks, first_n, diagonal_n, gpu_kernel=gpu,
                                  interpret=interpret)  # [B, H, K] ascending, packed set
    layout = build_block_layout(indices.reshape(batch * heads, num_blocks), n, ascending=True)
    # "full" mode: the low-resolution output is merged in the attention's forward kernel (GPU), and the gradient
    # that reaches the block sums through it is added in the backward kernels.
    # The GPU kernels compute the low-resolution part without writing n x n arrays.
    low_fn = functools.partial(low_resolution_output, scale=scale, gpu_kernel=gpu, interpret=interpret)
    low = dict(low_fn=low_fn, block_sums=sums, low_aux=(count, bits)) if full else {}
    out = merged_attention(query, key, value, layout, tokens, sm_scale=1.0 / scale, eps=EPS,
                           backend=implementation.removeprefix("pallas_"), interpret=interpret, **low)
    return out[:, :seq]
