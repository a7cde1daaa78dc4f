"""Weights in and out: PyTorch ``state_dict`` names and layouts for the built-in modules,
safetensors files, and DLPack (zero-copy) between asyncnn arrays and other array libraries.

torch is never imported here unless asked for (``tensors=True``, :func:`to_torch_tensor`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ._runtime._graph import Graph

__all__ = [
    "from_dlpack",
    "from_torch",
    "load_safetensors",
    "save_safetensors",
    "to_torch",
    "to_torch_tensor",
    "torch_names",
]


def _module_entries(module: Any, params: Any) -> list[tuple[str, tuple[Any, ...], bool]]:
    """``(torch suffix, path into params, transposed)`` for one module's parameters."""
    from ._math import _nn as mnn

    out: list[tuple[str, tuple[Any, ...], bool]] = []
    if isinstance(module, mnn.Sequential):
        for i, (m, p) in enumerate(zip(module.modules, params, strict=True)):
            out += [(f"{i}.{s}", (i, *path), t) for s, path, t in _module_entries(m, p)]
        return out
    if isinstance(module, mnn.Residual):
        return _module_entries(module.module, params)
    if not params:
        return []  # ReLU, Flatten, Dropout, pooling...
    if isinstance(module, mnn.Linear):
        return [(k, (k,), k == "weight") for k in params]
    if isinstance(module, mnn.Conv1d | mnn.Conv2d | mnn.LayerNorm | mnn.Embedding):
        return [(k, (k,), False) for k in params]  # the same layouts as torch
    if isinstance(module, mnn.MultiHeadAttention):
        names = {
            "in_proj_weight": ("in_proj_weight", True),
            "in_proj_bias": ("in_proj_bias", False),
            "out_proj_weight": ("out_proj.weight", True),
            "out_proj_bias": ("out_proj.bias", False),
        }
        return [(names[k][0], (k,), names[k][1]) for k in params]
    raise ValueError(
        f"no torch name mapping for {type(module).__name__}: the built-in Linear, Conv1d, "
        "Conv2d, LayerNorm, Embedding, MultiHeadAttention, Sequential and parameterless modules "
        "have one; give this module's weights with tr.params = {...} directly"
    )


def _layout(
    target: Any, params: Any, names: Mapping[str, str] | None
) -> dict[str, tuple[Any, ...]]:
    """``{torch name: (node or None, path, transposed)}`` for a graph or a module."""
    if isinstance(target, Graph):
        out: dict[str, tuple[Any, ...]] = {}
        offset = 0
        for name in target.layers:
            module = target.nodes[name].module
            p = params[name]
            entries = _module_entries(module, p)
            if names is not None:
                if name not in names:
                    if entries:
                        raise ValueError(
                            f"names has no torch prefix for layer {name!r}, which has weights; "
                            f"give one for each of {target.layers}"
                        )
                    continue
                prefix = names[name] + "." if names[name] else ""
                for s, path, t in entries:
                    out[prefix + s] = (name, path, t)
                continue
            # one torch nn.Sequential of every layer's modules in turn
            children = module.modules if _is_sequential(module) else [module]
            child_params = p if _is_sequential(module) else [p]
            for i, (m, cp) in enumerate(zip(children, child_params, strict=True)):
                for s, path, t in _module_entries(m, cp):
                    key_path = (i, *path) if _is_sequential(module) else path
                    out[f"{offset + i}.{s}"] = (name, key_path, t)
            offset += len(children)
        return out
    return {s: (None, path, t) for s, path, t in _module_entries(target, params)}


def _is_sequential(module: Any) -> bool:
    from ._math import _nn as mnn

    return isinstance(module, mnn.Sequential)


def _check_target(target: Any, fn: str) -> None:
    from ._math import _nn as mnn

    if not isinstance(target, Graph | mnn.Module):
        kind = type(target)
        raise TypeError(
            f"{fn}: target must be an asyncnn Graph or nn.Module, got {kind.__module__}."
            f"{kind.__name__}; pass the asyncnn graph or module that matches it (e.g. "
            "nn.Linear(in_features, out_features) for a torch.nn.Linear)"
        )


def _template(target: Any, dtype: str = "float64") -> Any:
    if isinstance(target, Graph):
        return {n: target.nodes[n].module.init(0, dtype=dtype) for n in target.layers}
    return target.init(0, dtype=dtype)


def torch_names(target: Any, names: Mapping[str, str] | None = None) -> list[str]:
    """The torch ``state_dict`` names that ``target`` (a Graph or a module) maps to.

    For a graph, the default matches one torch ``nn.Sequential`` holding every layer's modules
    in turn (as ``Graph.sequential`` splits them): ``"0.weight"``, ``"0.bias"``, ``"2.weight"``...
    ``names`` maps layer names to torch prefixes instead (``{"stage0": "features"}`` reads
    ``"features.0.weight"`` for the first module of ``stage0``'s ``Sequential``).
    """
    _check_target(target, "torch_names")
    return list(_layout(target, _template(target), names))


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    elif not isinstance(value, np.ndarray) and hasattr(value, "__dlpack__"):
        value = from_dlpack(value)
    from .backends import to_numpy

    return np.asarray(to_numpy(value))


def _set(tree: Any, path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def from_torch(
    state_dict: Mapping[str, Any], target: Any, names: Mapping[str, str] | None = None
) -> Any:
    """asyncnn parameters from a torch ``state_dict`` (tensors or numpy arrays).

    Linear weights are transposed (torch keeps ``(out, in)``, asyncnn ``(in, out)``); the other
    built-in modules share torch's layouts. The arrays are copies (a torch model trained on
    afterwards leaves them alone) and keep the state dict's dtype; assigning them to
    ``tr.params`` casts them to the trainer's.

    Example:
        ```python no-run
        tr.params = ann.interop.from_torch(torch_model.state_dict(), tr.graph)
        ```

    Args:
        state_dict: ``{torch name: tensor or array}`` (``model.state_dict()``, or
            :func:`load_safetensors` of a file torch wrote).
        target: a :class:`~asyncnn.Graph` (returns ``{layer: params}``) or a module (returns
            its params).
        names: for a graph, ``{layer: torch prefix}`` (see :func:`torch_names`).

    Raises:
        TypeError: a torch module given instead of its ``state_dict()``, or as ``target``.
        ValueError: a name missing from ``state_dict`` or left over in it, or a shape that
            does not fit (naming the torch name and the layer).
    """
    if not isinstance(state_dict, Mapping):
        kind = type(state_dict).__name__
        if hasattr(state_dict, "state_dict"):
            raise TypeError(
                f"from_torch: got the torch module {kind}, not its weights; pass model.state_dict()"
            )
        raise TypeError(f"from_torch: state_dict must be a mapping of name to array, got {kind}")
    _check_target(target, "from_torch")
    template = _template(target)
    layout = _layout(target, template, names)
    missing = [k for k in layout if k not in state_dict]
    extra = [k for k in state_dict if k not in layout]
    if missing or extra:
        raise ValueError(
            "the state dict does not match: "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {extra}" if extra else "")
            + f" (expected {list(layout)})"
        )
    out = template
    for key, (node, path, transposed) in layout.items():
        arr = _as_numpy(state_dict[key])
        arr = np.array(arr.T if transposed else arr, order="C")  # a copy: no memory shared
        tree = out[node] if node is not None else out
        want = _get(tree, path).shape
        if arr.shape != want:
            where = f"layer {node!r}" if node is not None else type(target).__name__
            raise ValueError(
                f"state dict entry {key!r} has shape {arr.shape[::-1] if transposed else arr.shape}"
                f"; {where} needs {want[::-1] if transposed else want}"
            )
        _set(tree, path, arr)
    return out


def to_torch(
    params: Any, target: Any, names: Mapping[str, str] | None = None, tensors: bool = False
) -> dict[str, Any]:
    """A torch ``state_dict`` from asyncnn parameters (the inverse of :func:`from_torch`).

    Args:
        params: ``tr.params`` (with a Graph ``target``) or one module's params.
        target: the :class:`~asyncnn.Graph` or module the params belong to.
        names: for a graph, ``{layer: torch prefix}`` (see :func:`torch_names`).
        tensors: return torch tensors (imports torch) instead of numpy arrays.

    Returns:
        ``{torch name: array}``, ready for ``model.load_state_dict`` (with ``tensors=True``) or
        :func:`save_safetensors`; copies, sharing no memory with ``params``.
    """
    _check_target(target, "to_torch")
    layout = _layout(target, params, names)
    out: dict[str, Any] = {}
    for key, (node, path, transposed) in layout.items():
        tree = params[node] if node is not None else params
        arr = _as_numpy(_get(tree, path))
        out[key] = np.array(arr.T if transposed else arr, order="C")  # a copy, as from_torch
    if tensors:
        import torch

        return {k: torch.from_numpy(v) for k, v in out.items()}
    return out


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file (one torch wrote too) as numpy arrays.

    Raises:
        FileNotFoundError: no such file. ValueError: not a safetensors file (naming it).
    """
    from safetensors.numpy import load_file

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no safetensors file at {path!r}")
    try:
        return dict(load_file(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc


def save_safetensors(arrays: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Writes ``{name: array}`` (e.g. :func:`to_torch`'s) as a safetensors file, which
    ``safetensors.torch.load_file`` reads back as tensors."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(_as_numpy(v)) for k, v in arrays.items()}, os.fspath(path))


def from_dlpack(tree: Any) -> Any:
    """Arrays of another library (torch, JAX, cupy...) as asyncnn's numpy or cupy arrays,
    sharing their memory (no copy), through DLPack. Works on a pytree of them.

    CPU tensors become numpy arrays, CUDA tensors cupy arrays (cupy needed). A library that
    cannot export (or a tensor that needs a gradient, in torch: call ``.detach()``) raises its
    own error.
    """
    return _map(_from_dlpack, tree)


def _has_dlpack(x: Any) -> bool:
    return hasattr(x, "__dlpack__")


def _map(fn: Callable[[Any], Any], tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _map(fn, v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_map(fn, v) for v in tree)
    return fn(tree)


def _from_dlpack(x: Any) -> Any:
    if not _has_dlpack(x):
        return x
    device_type, _ = x.__dlpack_device__()
    if int(device_type) in (1, 3):  # kDLCPU, kDLCUDAHost
        return np.from_dlpack(x)
    import cupy

    return cupy.from_dlpack(x)


def to_torch_tensor(tree: Any) -> Any:
    """asyncnn arrays (numpy or cupy; a pytree of them) as torch tensors sharing their memory,
    through DLPack (``torch.from_dlpack``). Needs torch."""
    import torch

    return _map(lambda a: torch.from_dlpack(a) if _has_dlpack(a) else a, tree)
