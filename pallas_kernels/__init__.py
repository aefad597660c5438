"""Block-sparse Pallas kernels for MRA's high-resolution attention (GPU Triton and TPU Mosaic).

Independent of ``mra_jax``: the library depends on the kernels, never the reverse.
"""
