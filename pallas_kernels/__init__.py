"""Block-sparse Pallas kernels for MRA's high-resolution attention (GPU Triton and TPU Mosaic).

Independent of ``mra_jax``: the library depends on the kernels, never the reverse.

Public API:

* :func:`block_sparse_attention` — differentiable ``(o, lse)`` block-sparse attention; ``backend="gpu"`` (default,
  Pallas Triton kernels in :mod:`pallas_kernels.gpu`) or ``backend="tpu"`` (Pallas Mosaic kernels in
  :mod:`pallas_kernels.tpu`);
* :func:`block_sparse_attention_reference` — pure-jnp oracle / fallback with the same signature;
* :class:`BlockLayout` / :func:`build_block_layout` — on-device CSR row/column views of a block selection;
* :func:`topk_indices` — exact, faster replacement for ``lax.top_k`` indices (same set, same tie rule).
"""

from .layout import BlockLayout, build_block_layout
from .ops import BLOCK, block_sparse_attention, block_sparse_attention_reference
from .selection import topk_indices

__all__ = [
    "BLOCK",
    "BlockLayout",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "build_block_layout",
    "topk_indices",
]
