"""Test session setup.

Without a GPU, the Triton kernels run on CPU tensors through the interpreter,
which must be switched on before triton is first imported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
