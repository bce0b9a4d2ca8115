"""Triton kernels, installed as ``kdbench.kernels`` (never as a top-level ``kernels``).

One file per op: the ``@triton.jit`` kernels, the launcher that validates,
allocates, picks the block size and warps, and the ``autograd.Function``.
Importing this package does not import triton; import an op's module to load it.
"""
