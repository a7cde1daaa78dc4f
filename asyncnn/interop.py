"""Weights in and out: PyTorch state dicts (names and layouts of the built-in modules),
safetensors files, and DLPack zero-copy exchange with torch, JAX and cupy. See
``docs/workflow.md``."""

from ._interop import (
    from_dlpack,
    from_torch,
    to_torch,
    to_torch_tensor,
    torch_names,
)
from ._safetensors_io import load_safetensors, save_safetensors

__all__ = [
    "from_dlpack",
    "from_torch",
    "load_safetensors",
    "save_safetensors",
    "to_torch",
    "to_torch_tensor",
    "torch_names",
]
