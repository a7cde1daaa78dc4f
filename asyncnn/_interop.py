"""Weights in and out: PyTorch ``state_dict`` names and layouts for the built-in modules,
safetensors files, and DLPack (zero-copy) between asyncnn arrays and other array libraries.

torch is never imported here unless asked for (``tensors=True``, :func:`to_torch_tensor`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ._interop_names import Names, mismatch_hint
from ._interop_names import layout as name_layout
from ._math._nn._module import Initializer
from ._runtime._graph import Graph
from .backends import BFLOAT16

__all__ = [
    "from_dlpack",
    "from_torch",
    "to_torch",
    "to_torch_tensor",
    "torch_names",
]


def _check_target(target: Any, fn: str) -> None:
    from ._math import _nn as mnn

    if not isinstance(target, Graph | mnn.Module):
        kind = type(target)
        raise TypeError(
            f"{fn}: target must be an asyncnn Graph or nn.Module, got {kind.__module__}."
            f"{kind.__name__}; pass the asyncnn graph or module that matches it (e.g. "
            "nn.Linear(in_features, out_features) for a torch.nn.Linear)"
        )


def _template(target: Any) -> Any:
    """``target``'s parameter pytree with a stand-in of the right shape and no memory for each
    weight: all that the names, the layout and the shape checks read."""
    if isinstance(target, Graph):
        return {n: _shapes_of(target.nodes[n].module) for n in target.layers}
    return _shapes_of(target)


def _shapes_of(module: Any) -> Any:
    # (init's own checks first: a module that is no dataclass is refused as init refuses it)
    init = module._initializer(0, "numpy", "float64")
    return module.init_params(_ShapeInitializer(init.seed, init.backend, init.dtype))


class _ShapeInitializer(Initializer):
    """An initializer that gives stand-ins of the shapes asked for instead of drawing values
    (read-only float64 arrays over one element, zero strides): a template drawn in full was
    210 MB of float64 and 0.75 s for a model of 26M parameters, read for its names and shapes
    only. A module of one's own that draws from ``rng`` itself and hands the values to
    ``asarray`` still draws them (the built-in modules never do)."""

    def spawn(self, n: int) -> list[Initializer]:
        return [_ShapeInitializer(s, self.backend, self.dtype) for s in self.seed.spawn(n)]

    def _stand_in(self, shape: Any) -> np.ndarray:
        return np.broadcast_to(np.zeros((), dtype=self.dtype), tuple(int(n) for n in shape))

    def asarray(self, host: Any) -> Any:
        return self._stand_in(np.shape(host))

    def uniform(self, shape: Sequence[int], bound: float) -> Any:
        return self._stand_in(shape)

    def normal(self, shape: Sequence[int], std: float = 1.0) -> Any:
        return self._stand_in(shape)

    def zero_rows(self, array: Any, rows: Sequence[int]) -> Any:
        return array  # (a stand-in holds no values to set)

    def zeros(self, shape: Sequence[int]) -> Any:
        return self._stand_in(shape)

    def ones(self, shape: Sequence[int]) -> Any:
        return self._stand_in(shape)


def torch_names(target: Any, names: Names | None = None) -> list[str]:
    """The torch ``state_dict`` names that ``target`` (a Graph or a module) maps to.

    For a graph, the default matches one torch ``nn.Sequential`` holding every layer's modules
    in turn (as ``Graph.sequential`` splits them): ``"0.weight"``, ``"0.bias"``, ``"2.weight"``...
    ``names`` maps layer names to torch prefixes instead (``{"stage0": "features"}`` reads
    ``"features.0.weight"`` for the first module of ``stage0``'s ``Sequential``), or to one
    prefix per module of the layer, for a torch model of named attributes: ``{"stage0": ["emb",
    "rnn"], "stage1": ["fc"]}`` reads ``"emb.weight"``, ``"rnn.weight_ih_l0"``, ...,
    ``"fc.bias"`` (a module without weights takes any prefix, unread).

    Raises:
        ValueError: ``names`` lacks a layer that has weights, gives a list of prefixes whose
            length is not its layer's number of modules (naming them), or maps two layers to
            the same torch name (naming both and the name); a module with weights but no torch mapping
            (a custom one, ``RNNCell``), naming its layer and its path in it; the same in
            :func:`from_torch` and :func:`to_torch`.
    """
    _check_target(target, "torch_names")
    return list(name_layout(target, _template(target), names))


def _as_numpy(value: Any, what: str = "an array") -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = _torch_to_numpy(value, what)
    elif not isinstance(value, np.ndarray) and hasattr(value, "__dlpack__"):
        value = from_dlpack(value)
    from .backends import to_numpy

    return np.asarray(to_numpy(value))


def _is_torch_bfloat16(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and str(getattr(x, "dtype", "")) == (
        "torch.bfloat16"
    )


def _no_bfloat16(what: str) -> TypeError:
    return TypeError(
        f"{what} is a torch.bfloat16 tensor: numpy holds bfloat16 only with the ml_dtypes "
        "package installed (pip install ml_dtypes), or convert it first with .float()"
    )


def _torch_to_numpy(t: Any, what: str) -> np.ndarray:
    """A numpy view of a (CPU copy of a) torch tensor: bfloat16 through ml_dtypes, bit for bit
    (torch's ``.numpy()`` refuses it)."""
    import torch

    t = t.detach().cpu().resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        if BFLOAT16 is None:
            raise _no_bfloat16(what)
        return np.asarray(t.view(torch.int16).numpy().view(BFLOAT16))
    try:
        return np.asarray(t.numpy())
    except TypeError as exc:  # float8 and the other dtypes numpy has none of
        raise TypeError(
            f"{what} is a {t.dtype} tensor, which numpy cannot hold ({exc}); convert it first "
            "(e.g. .float())"
        ) from exc


def _numpy_to_torch(a: np.ndarray) -> Any:
    import torch

    if BFLOAT16 is not None and a.dtype == BFLOAT16:  # torch.from_numpy refuses ml_dtypes'
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _set(tree: Any, path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _leaf_paths(tree: Any, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], Any]:
    """``{path: leaf}`` of a pytree of dicts, lists and tuples."""
    if isinstance(tree, Mapping):
        items: Any = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        return {path: tree}
    out: dict[tuple[Any, ...], Any] = {}
    for k, v in items:
        out.update(_leaf_paths(v, (*path, k)))
    return out


def _path_str(path: tuple[Any, ...]) -> str:
    return "params" + "".join(f"[{p!r}]" for p in path)


def _check_fits(params: Any, template: Any, target: Any) -> None:
    """Refuses ``params`` that are not ``template``'s structure and shapes, naming the leaves."""
    given, want = _leaf_paths(params), _leaf_paths(template)
    problems = []
    missing = [_path_str(p) for p in want if p not in given]
    extra = [_path_str(p) for p in given if p not in want]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected {', '.join(extra)}")
    for p, leaf in want.items():
        if p in given and tuple(np.shape(given[p])) != tuple(leaf.shape):
            problems.append(
                f"{_path_str(p)} has shape {tuple(np.shape(given[p]))}, the target needs "
                f"{tuple(leaf.shape)}"
            )
    if problems:
        what = "graph" if isinstance(target, Graph) else repr(target)
        raise ValueError(
            f"to_torch: params do not fit the {what}: {'; '.join(problems)}; pass the "
            "params of this target (tr.params for tr.graph)"
        )


#: buffers of torch's BatchNorm layers (no asyncnn module has them)
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def from_torch(state_dict: Mapping[str, Any], target: Any, names: Names | None = None) -> Any:
    """asyncnn parameters from a torch ``state_dict`` (tensors or numpy arrays).

    Linear weights are transposed (torch keeps ``(out, in)``, asyncnn ``(in, out)``); the other
    built-in modules share torch's layouts. The arrays are copies (a torch model trained on
    afterwards leaves them alone) and keep the state dict's dtype (bfloat16 through
    ``ml_dtypes``); assigning them to ``tr.params`` casts them to the trainer's. Only names and
    shapes are checked: settings a state dict does not hold (an Embedding's ``padding_idx``, a
    conv's ``padding_mode``) must match by construction; a conv's ``groups`` shows in its
    weight's shape, ``(out, in // groups, *kernel)``, and is checked with it. Entries that are one tensor in torch
    (tied weights) become two copies that train apart, with a ``UserWarning`` naming them.

    Example:
        ```python no-run
        tr.params = ann.interop.from_torch(torch_model.state_dict(), tr.graph)
        ```

    Args:
        state_dict: ``{torch name: tensor or array}`` (``model.state_dict()``, or
            :func:`load_safetensors` of a file torch wrote).
        target: a :class:`~asyncnn.Graph` (returns ``{layer: params}``) or a module (returns
            its params).
        names: for a graph, ``{layer: torch prefix}``, or ``{layer: [one torch prefix per
            module of it]}`` (see :func:`torch_names`).

    Raises:
        TypeError: a torch module given instead of its ``state_dict()``, or as ``target``; a
            tensor of a dtype numpy cannot hold (bfloat16 without ``ml_dtypes``), naming it.
        ValueError: a name missing from ``state_dict`` or left over in it (batch-norm running
            statistics named as such), or a shape that does not fit (naming the torch name and
            the layer); ``names`` that map two layers to the same torch name (naming both); a
            module with weights but no torch mapping (naming its layer and its path in it).
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
    layout = name_layout(target, template, names)
    missing = [k for k in layout if k not in state_dict]
    extra = [k for k in state_dict if k not in layout]
    if missing or extra:
        stats = sorted({k.rpartition(".")[0] for k in extra if k.rpartition(".")[2] in _BUFFERS})
        raise ValueError(
            "the state dict does not match: "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {extra}" if extra else "")
            + f" (expected {list(layout)})"
            + (
                f"; torch module(s) {stats} hold batch-norm running statistics, and asyncnn has "
                "no batch norm: fold each into the layer before it (in eval mode) first"
                if stats
                else ""
            )
            + mismatch_hint(target, extra, names)
        )
    _warn_tied(state_dict, list(layout))
    out = template
    for key, (node, path, transposed) in layout.items():
        arr = _as_numpy(state_dict[key], f"state dict entry {key!r}")
        arr = np.array(arr.T if transposed else arr, order="C")  # a copy: no memory shared
        if not arr.dtype.isnative:  # (a big-endian file's: to_torch's tensors refused it)
            arr = arr.astype(arr.dtype.newbyteorder("="))
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


def _memory_id(value: Any) -> tuple[Any, ...] | None:
    """What identifies the memory ``value`` reads (one tensor's storage, offset, shape and
    strides), or None for an object whose memory cannot be told."""
    if getattr(value, "size", None) == 0 or (hasattr(value, "numel") and value.numel() == 0):
        return None  # (empty tensors share the null pointer: nothing to tie)
    if hasattr(value, "untyped_storage") and hasattr(value, "storage_offset"):  # torch
        return (
            str(value.device), value.untyped_storage().data_ptr(), value.storage_offset(),
            tuple(value.shape), tuple(value.stride()), str(value.dtype),
        )  # fmt: skip
    for attr in ("__array_interface__", "__cuda_array_interface__"):
        face = getattr(value, attr, None)
        if isinstance(face, dict) and face.get("data"):
            return (
                attr,
                face["data"][0],
                tuple(face["shape"]),
                face.get("strides"),
                face["typestr"],
            )
    return None


def _warn_tied(state_dict: Mapping[str, Any], keys: list[str]) -> None:
    """Warns of entries that are one tensor in torch (tied weights): asyncnn keeps a copy of
    each, so they train apart, and a round trip back into the tied model keeps one of them."""
    first: dict[tuple[Any, ...], str] = {}
    for key in keys:
        ident = _memory_id(state_dict[key])
        if ident is None:
            continue
        if ident in first:
            warnings.warn(
                f"from_torch: state dict entries {first[ident]!r} and {key!r} are one tensor in "
                "torch (tied weights); asyncnn takes two copies of it, which train apart, and "
                "loading to_torch's result back into the tied torch model keeps only the entry "
                "loaded last. Untie them in torch first (clone one) to silence this",
                UserWarning,
                stacklevel=3,
            )
        else:
            first[ident] = key


def to_torch(
    params: Any, target: Any, names: Names | None = None, tensors: bool = False
) -> dict[str, Any]:
    """A torch ``state_dict`` from asyncnn parameters (the inverse of :func:`from_torch`).

    Args:
        params: ``tr.params`` (with a Graph ``target``) or one module's params.
        target: the :class:`~asyncnn.Graph` or module the params belong to.
        names: for a graph, ``{layer: torch prefix}``, or ``{layer: [one torch prefix per
            module of it]}`` (see :func:`torch_names`).
        tensors: return torch tensors (imports torch) instead of numpy arrays.

    Returns:
        ``{torch name: array}``, ready for ``model.load_state_dict`` (with ``tensors=True``) or
        :func:`save_safetensors`; copies, sharing no memory with ``params``, in their dtype
        (bfloat16 included), on the CPU.

    Raises:
        ValueError: ``params`` not of ``target``'s structure and shapes (naming the leaves);
            ``names`` that map two layers to the same torch name (naming both); a module with
            weights but no torch mapping (naming its layer and its path in it).
    """
    _check_target(target, "to_torch")
    template = _template(target)
    _check_fits(params, template, target)
    layout = name_layout(target, template, names)
    out: dict[str, Any] = {}
    for key, (node, path, transposed) in layout.items():
        tree = params[node] if node is not None else params
        arr = _as_numpy(_get(tree, path), _path_str((*(() if node is None else (node,)), *path)))
        out[key] = np.array(arr.T if transposed else arr, order="C")  # a copy, as from_torch
    if tensors:
        return {k: _numpy_to_torch(v) for k, v in out.items()}
    return out


def from_dlpack(tree: Any) -> Any:
    """Arrays of another library (torch, JAX, cupy...) as asyncnn's numpy or cupy arrays,
    sharing their memory (no copy), through DLPack. Works on a pytree of them.

    CPU tensors become numpy arrays, CUDA tensors cupy arrays (cupy needed); torch's bfloat16
    ones too, through ``ml_dtypes``. A library that cannot export (or a tensor that needs a
    gradient, in torch: call ``.detach()``; one with the conjugate bit) raises its own error.

    Raises:
        ValueError: a torch tensor with the negative bit (``z.conj().imag``, where
            ``x.is_neg()``), whose memory holds the negated values: pass ``x.resolve_neg()``
            (a copy).
    """
    return _map(_from_dlpack, tree)


def _has_dlpack(x: Any) -> bool:
    return hasattr(x, "__dlpack__")


def _map(fn: Callable[[Any, tuple[Any, ...]], Any], tree: Any, path: tuple[Any, ...] = ()) -> Any:
    """``fn(leaf, its path)`` over a pytree of dicts, lists, tuples and namedtuples."""
    if isinstance(tree, Mapping):
        return {k: _map(fn, v, (*path, k)) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a namedtuple
        return type(tree)(*(_map(fn, v, (*path, i)) for i, v in enumerate(tree)))
    if isinstance(tree, list | tuple):
        return type(tree)(_map(fn, v, (*path, i)) for i, v in enumerate(tree))
    return fn(tree, path)


def _leaf_name(path: tuple[Any, ...]) -> str:
    """A leaf of the pytree given to :func:`from_dlpack` or :func:`to_torch_tensor`, named."""
    return "tree" + "".join(f"[{p!r}]" for p in path) if path else "the array"


def _from_dlpack(x: Any, path: tuple[Any, ...] = ()) -> Any:
    if not _has_dlpack(x):
        return x
    if type(x).__module__.startswith("torch") and getattr(x, "is_neg", lambda: False)():
        # (torch exports the memory without the lazy negation: every sign would flip)
        raise ValueError(
            f"from_dlpack: {_leaf_name(path)} is a torch negative-bit view (is_neg(): a lazy "
            f"negation, such as z.conj().imag) of shape {tuple(x.shape)}, whose memory holds "
            "the negated values and cannot be shared; pass x.resolve_neg() (a copy)"
        )
    if _is_torch_bfloat16(x):  # DLPack importers refuse bfloat16: the same bits as int16
        if BFLOAT16 is None:
            raise _no_bfloat16(f"from_dlpack: {_leaf_name(path)}")
        import torch

        return _from_dlpack(x.view(torch.int16), path).view(BFLOAT16)
    device_type, _ = x.__dlpack_device__()
    if int(device_type) in (1, 3):  # kDLCPU, kDLCUDAHost
        return np.from_dlpack(x)
    import cupy

    return cupy.from_dlpack(x)


def to_torch_tensor(tree: Any) -> Any:
    """asyncnn arrays (numpy or cupy; a pytree of them) as torch tensors sharing their memory,
    through DLPack (``torch.from_dlpack``). Needs torch. A numpy scalar (``np.float32(3.0)``)
    becomes a 0-d tensor, as a 0-d array does (a scalar has no memory to share); other leaves
    that are no arrays (Python numbers, strings) pass through.

    Raises:
        ValueError: an array with a negative stride (a reversed view such as ``x[::-1]``),
            which no torch tensor can share; a read-only numpy array (``tr.params``' arrays
            are), which torch, having no read-only tensors, would share writable (an in-place
            torch op would change it): pass a copy (``to_torch(tr.params, tr.graph,
            tensors=True)`` copies a trainer's weights).
    """
    return _map(_to_torch_tensor, tree)


def _to_torch_tensor(a: Any, path: tuple[Any, ...] = ()) -> Any:
    if isinstance(a, np.generic) and (a.dtype.kind in "biufc" or a.dtype == BFLOAT16):
        # a numpy scalar has no __dlpack__: its 0-d array, of a dtype DLPack takes (a float8 or
        # int4 scalar, or raw bytes, passes through as before: an array of them fails there)
        a = np.asarray(a)
    if not _has_dlpack(a):
        return a
    strides = getattr(a, "strides", None)  # numpy's and cupy's, in bytes
    if isinstance(strides, tuple) and any(s < 0 for s in strides):  # torch.from_dlpack aborts
        raise ValueError(
            f"to_torch_tensor: {_leaf_name(path)}, an array of shape {tuple(a.shape)}, has "
            f"negative strides {strides} (a reversed view such as x[::-1]), which a torch tensor "
            "cannot share; pass a copy, numpy.ascontiguousarray(x) (or cupy's)"
        )
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        # (torch.from_dlpack drops DLPack's read-only flag: the tensor would write through)
        raise ValueError(
            f"to_torch_tensor: {_leaf_name(path)} is a read-only array of shape "
            f"{tuple(a.shape)} ({a.dtype}), and a torch tensor over it would be writable (torch "
            "has no read-only tensors): an in-place torch op would change it (for tr.params, "
            "the trainer's weights, behind its back). Pass a copy: x.copy(), or for a "
            "trainer's weights interop.to_torch(tr.params, tr.graph, tensors=True)"
        )
    import torch

    if BFLOAT16 is not None and getattr(a, "dtype", None) == BFLOAT16:
        return torch.from_dlpack(a.view(np.int16)).view(torch.bfloat16)  # the same bits
    return torch.from_dlpack(a)
