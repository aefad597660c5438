"""Pure-torch versions of the three CUDA ops HF's MRA calls (the authors' kernels in HF's `kernels/mra/`).

Assigned to ``transformers.models.mra.modeling_mra.mra_cuda_kernel`` they make HF's own ``mra2_attention`` run
on a CPU, which gives an independent oracle for our attention.
"""

from __future__ import annotations

import types

import torch


def _rows_cols(indices: torch.Tensor, num_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    indices = indices.long()
    return indices // num_cols, indices % num_cols


def mm_to_sparse(dense_a: torch.Tensor, dense_b: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``[b, nA, d, 32]``, ``[b, nB, d, 32]`` -> ``[b, k, 32, 32]``: ``C[p, a, c] = B[col, :, a] . A[row, :, c]``."""
    rows, cols = _rows_cols(indices, dense_b.shape[1])
    batch = torch.arange(indices.shape[0])[:, None]
    a = dense_a[batch, rows]
    b = dense_b[batch, cols]
    return torch.einsum("xkda,xkdc->xkac", b, a)


def sparse_dense_mm(sparse_a: torch.Tensor, indices: torch.Tensor, dense_b: torch.Tensor,
                    a_num_block: int) -> torch.Tensor:
    """``C[i, d, c] = sum over p in row i, a of B[col(p), d, a] * A[p, a, c]`` -> ``[b, nA, d, 32]``."""
    rows, cols = _rows_cols(indices, dense_b.shape[1])
    batch = torch.arange(indices.shape[0])[:, None]
    contrib = torch.einsum("xkda,xkac->xkdc", dense_b[batch, cols], sparse_a)
    out = torch.zeros(dense_b.shape[0], a_num_block, *dense_b.shape[2:], dtype=sparse_a.dtype)
    out.index_put_((batch.expand_as(rows), rows), contrib, accumulate=True)
    return out


def index_max(index_vals: torch.Tensor, indices: torch.Tensor, a_num_block: int, b_num_block: int):
    """Block-row max of ``index_vals`` ``[b, 32, k]``, truncated toward zero to 1e-3; -1e5 for empty rows."""
    rows, _ = _rows_cols(indices, b_num_block)
    batch = index_vals.shape[0]
    quantized = (index_vals * 1000).to(torch.int32)                          # trunc toward zero
    slots = (rows[:, None, :] * 32 + torch.arange(32)[None, :, None])         # [b, 32, k]
    buf = torch.full((batch, a_num_block * 32), -100000000, dtype=torch.int32)
    buf.scatter_reduce_(1, slots.reshape(batch, -1), quantized.reshape(batch, -1), reduce="amax")
    max_vals = (buf.double() / 1000).float()
    scatter = torch.gather(max_vals, 1, slots.reshape(batch, -1)).reshape(slots.shape)
    return max_vals, scatter


KERNEL = types.SimpleNamespace(mm_to_sparse=mm_to_sparse, sparse_dense_mm=sparse_dense_mm, index_max=index_max)


class StableTopkTorch(types.ModuleType):
    """``torch`` with a ``topk`` that keeps the lowest indices among ties, as CUDA's does (CPU torch does not).

    Installed as ``modeling_mra.torch`` so that HF's selection code runs unchanged with CUDA's tie rule.
    """

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def topk(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
        values, indices = torch.sort(x, dim=dim, descending=largest, stable=True)
        return types.SimpleNamespace(values=values.narrow(dim, 0, k), indices=indices.narrow(dim, 0, k))


def selected_set_mask(get_block_idxes):
    """Wrap HF's ``get_block_idxes`` so that "full" mode's high-resolution mask is exactly the top-k set.

    HF marks every pair scoring at least the k-th value; pairs tied there but not returned by top-k then fall out
    of both resolutions (a bug this project fixes). Without ties both masks are equal.
    """

    def wrapped(logits, num_blocks, approx_mode, first_n, diagonal_n):
        indices, mask = get_block_idxes(logits, num_blocks, approx_mode, first_n, diagonal_n)
        if mask is not None:
            flat = torch.zeros(mask.shape[0], mask.shape[1] * mask.shape[2], dtype=mask.dtype)
            mask = flat.scatter_(1, indices.long(), 1.0).reshape(mask.shape)
        return indices, mask

    return wrapped


def run_hf_mra_on_cpu(monkeypatch, modeling_mra) -> None:
    """Make transformers' ``modeling_mra`` run on the CPU with these pure-torch ops and CUDA's selection rules."""
    monkeypatch.setattr(modeling_mra, "mra_cuda_kernel", KERNEL)
    monkeypatch.setattr(modeling_mra, "torch", StableTopkTorch())
    monkeypatch.setattr(modeling_mra, "get_block_idxes", selected_set_mask(modeling_mra.get_block_idxes))
