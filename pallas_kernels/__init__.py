"""Block-sparse Pallas kernels for MRA's high-resolution attention (GPU Triton and TPU Mosaic) and their reference.

Independent of ``mra_jax``: the library depends on the kernels, never the reverse.

Public API:

* :func:`block_sparse_attention` — differentiable ``(o, lse)`` block-sparse attention on ``[B, S, H, d]``;
  ``backend="gpu"`` (Pallas Triton kernels, :mod:`pallas_kernels.gpu`), ``"tpu"`` (Pallas Mosaic kernels,
  :mod:`pallas_kernels.tpu`) or ``"reference"`` (pure jnp, same contract);
* :func:`merged_attention` — MRA's output: the same attention merged with a per-block low-resolution part
  (:mod:`pallas_kernels.merge`), in the GPU forward kernel's epilogue;
* :data:`BLOCK` (32 tokens), :class:`BlockLayout` / :func:`build_block_layout` — on-device CSR row/column views of a
  block selection;
* :func:`matmul_precision` — the float32-HIGHEST / default precision rule of every matmul;
* :func:`topk_indices` — exact, faster replacement for ``lax.top_k`` indices (same set, same tie rule);
* :mod:`pallas_kernels.low_resolution` — MRA's selection scores and low-resolution part as GPU kernels over the block
  sums (no n x n array in memory).
"""

from .layout import BLOCK, BlockLayout, build_block_layout
from .numerics import matmul_precision
from .ops import BACKENDS, block_sparse_attention, merged_attention
from .selection import topk_indices

__all__ = ["BACKENDS", "BLOCK", "BlockLayout", "block_sparse_attention", "build_block_layout", "matmul_precision",
           "merged_attention", "topk_indices"]
