"""The numpy backend: arrays in host memory, work on CPU threads."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._base import Backend, Device


class NumpyBackend(Backend):
    name = "numpy"
    xp = np

    def __init__(self) -> None:
        self.device = Device("cpu")

    def rng(self, seed: int | np.random.SeedSequence) -> np.random.Generator:
        return np.random.default_rng(seed)

    def asarray(self, x: Any, dtype: Any = None) -> np.ndarray[Any, Any]:
        if hasattr(x, "__cuda_array_interface__"):
            x = x.get()  # a cupy array: copy it to the host
        try:
            return np.asarray(x, dtype=dtype)
        except TypeError:
            if dtype is None:
                raise
            self.dtype(dtype)  # a dtype numpy does not know: say so, and how to fix it
            raise

    def is_local(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def to_numpy(self, x: Any) -> np.ndarray[Any, Any]:
        return self.asarray(x)
