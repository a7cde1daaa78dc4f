"""The torch ``state_dict`` names of a graph's or a module's parameters (``interop``'s
layout): each built-in module's names and layouts, one torch ``nn.Sequential`` of a graph's
layers by default, or the prefixes ``names=`` gives per layer, or per module of a layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._runtime._graph import Graph

#: ``names=``: per layer, one torch prefix for its modules (numbered within it, as an
#: ``nn.Sequential``'s), or one prefix per module of it (a torch model's attribute names)
Names = Mapping[str, "str | Sequence[str]"]

__all__ = ["Names", "layout", "mismatch_hint"]


def _module_entries(
    module: Any, params: Any, layer: str | None = None, where: str = ""
) -> list[tuple[str, tuple[Any, ...], bool]]:
    """``(torch suffix, path into params, transposed)`` for one module's parameters.

    ``layer`` (the graph layer holding ``module``, or None for a module target) and ``where``
    (the attribute path from that layer's module, or the target, down to ``module``:
    ``".modules[1].module"``) only name a module that has no mapping.
    """
    from ._math import _nn as mnn
    from ._math._nn._loops import Loop
    from ._math._nn._recurrent import LoopCell

    out: list[tuple[str, tuple[Any, ...], bool]] = []
    if isinstance(module, mnn.Sequential):
        for i, (m, p) in enumerate(zip(module.modules, params, strict=True)):
            inner = _module_entries(m, p, layer, f"{where}.modules[{i}]")
            out += [(f"{i}.{s}", (i, *path), t) for s, path, t in inner]
        return out
    if isinstance(module, mnn.Residual):
        return _module_entries(module.module, params, layer, f"{where}.module")
    if isinstance(module, Loop | LoopCell):  # a loop's params are its cell's, by its names
        return _module_entries(module.cell, params, layer, f"{where}.cell")
    if not params:
        return []  # ReLU, Flatten, Dropout, pooling...
    if isinstance(module, mnn.Linear):
        return [(k, (k,), k == "weight") for k in params]
    if isinstance(module, mnn.Conv1d | mnn.Conv2d | mnn.LayerNorm | mnn.GroupNorm | mnn.Embedding):
        return [(k, (k,), False) for k in params]  # the same layouts as torch
    if isinstance(module, mnn.LSTM | mnn.GRU | mnn.LSTMCell | mnn.GRUCell):
        # torch's names; the weights stored (in, out) as Linear's
        return [(k, (k,), k.startswith("weight_")) for k in params]
    if isinstance(module, mnn.MultiHeadAttention):
        names = {
            "in_proj_weight": ("in_proj_weight", True),
            "in_proj_bias": ("in_proj_bias", False),
            "out_proj_weight": ("out_proj.weight", True),
            "out_proj_bias": ("out_proj.bias", False),
        }
        return [(names[k][0], (k,), names[k][1]) for k in params]
    # (two layers may hold modules of one class: name the layer, and where in it)
    if layer is None:
        at = f" (at target{where})" if where else ""
    elif where:
        at = f" (layer {layer!r}, at graph.nodes[{layer!r}].module{where})"
    else:
        at = f" (layer {layer!r})"
    raise ValueError(
        f"no torch name mapping for {type(module).__name__}{at}: the built-in Linear, Conv1d, "
        "Conv2d, LayerNorm, GroupNorm, Embedding, MultiHeadAttention, LSTM, GRU, LSTMCell, "
        "GRUCell, Sequential, Residual and parameterless modules have one; give this module's "
        "weights with tr.params = {...} directly"
    )


def layout(target: Any, params: Any, names: Names | None) -> dict[str, tuple[Any, ...]]:
    """``{torch name: (node or None, path, transposed)}`` for a graph or a module."""
    if isinstance(target, Graph):
        if names is not None:
            unknown = [n for n in names if n not in target.layers]
            if unknown:
                # (ignored: a misspelt layer's prefix went nowhere, without a word)
                raise ValueError(
                    f"names gives torch prefixes for {unknown}, which are no layers of the "
                    f"graph (its layers: {target.layers})"
                )
        out: dict[str, tuple[Any, ...]] = {}
        offset = 0
        for name in target.layers:
            module = target.nodes[name].module
            p = params[name]
            entries = _module_entries(module, p, name)
            if names is not None:
                if name not in names:
                    if entries:
                        raise ValueError(
                            f"names has no torch prefix for layer {name!r}, which has weights; "
                            f"give one for each of {target.layers}"
                        )
                    continue
                for key, entry in _named_entries(name, module, p, names[name]):
                    if key in out and out[key][0] == name:
                        raise ValueError(
                            f"names[{name!r}] = {names[name]!r} gives two of the layer's modules "
                            f"the torch name {key!r}; give each module a prefix of its own"
                        )
                    if key in out:
                        # (the later layer's entry replaced the earlier's: from_torch left that
                        # layer at the template's random weights, to_torch dropped its own)
                        raise ValueError(
                            f"names: layers {out[key][0]!r} and {name!r} both map to the torch "
                            f"name {key!r} (prefixes {names[out[key][0]]!r} and {names[name]!r}); "
                            "give each layer a prefix of its own"
                        )
                    out[key] = entry
                continue
            # one torch nn.Sequential of every layer's modules in turn
            children = _children_entries(name, module, p)
            for i, entries_i in enumerate(children):
                for s, entry in entries_i:
                    out[f"{offset + i}.{s}"] = entry
            offset += len(children)
        return out
    return {s: (None, path, t) for s, path, t in _module_entries(target, params)}


def _named_entries(
    name: str, module: Any, params: Any, prefix: Any
) -> list[tuple[str, tuple[Any, ...]]]:
    """``(torch name, (layer, path, transposed))`` of layer ``name``'s parameters under its
    ``names=`` entry: one prefix (the layer's modules numbered under it, as an
    ``nn.Sequential``'s, or a lone module's names under it), or one prefix per module of the
    layer, in order (each module's own names under its prefix, no number)."""
    if isinstance(prefix, str):
        head = prefix + "." if prefix else ""
        return [(head + s, (name, path, t)) for s, path, t in _module_entries(module, params, name)]
    modules = _modules_of(module)
    if (
        not isinstance(prefix, Sequence)
        or not all(isinstance(x, str) for x in prefix)
        or len(prefix) != len(modules)
    ):
        raise ValueError(
            f"names[{name!r}] must be one torch prefix (a str) or a list of one per module of "
            f"the layer ({len(modules)}: {', '.join(type(m).__name__ for m in modules)}), got "
            f"{prefix!r}"
        )
    return [
        ((head + "." if head else "") + s, entry)
        for head, entries in zip(prefix, _children_entries(name, module, params), strict=True)
        for s, entry in entries
    ]


def _modules_of(module: Any) -> list[Any]:
    """A layer's modules in turn: a Sequential's, or the lone module."""
    return list(module.modules) if _is_sequential(module) else [module]


def _children_entries(
    name: str, module: Any, params: Any
) -> list[list[tuple[str, tuple[Any, ...]]]]:
    """For each module of layer ``name`` in turn (:func:`_modules_of`), ``(torch suffix,
    (layer, path into the layer's params, transposed))`` of its parameters."""
    if not _is_sequential(module):
        return [[(s, (name, path, t)) for s, path, t in _module_entries(module, params, name)]]
    return [
        [(s, (name, (i, *path), t)) for s, path, t in _module_entries(m, p, name, f".modules[{i}]")]
        for i, (m, p) in enumerate(zip(module.modules, params, strict=True))
    ]


def mismatch_hint(target: Any, extra: list[str], names: Names | None) -> str:
    """What to say where a state dict's names do not match a graph's default layout: names
    that are no ``nn.Sequential``'s (``"emb.weight"``, a torch model's attributes) need
    ``names=``, one prefix per module, shown for the graph's own layers (so that a user sees
    how its stages cut the chain)."""
    if names is not None or not isinstance(target, Graph):
        return ""
    if not any(not k.split(".", 1)[0].isdigit() for k in extra):
        return ""
    shape = ", ".join(
        f"{n!r}: [" + ", ".join(f"<{type(m).__name__}'s attribute>" for m in _modules_of(
            target.nodes[n].module)) + "]"
        for n in target.layers
    )  # fmt: skip
    return (
        "; the state dict's names are a torch model's attributes, not one nn.Sequential's "
        "(0.weight, 1.weight, ...): give names= one torch prefix per module of each layer, in "
        f"order: names={{{shape}}} (a prefix of a module without weights is not read; "
        "torch_names(graph, names) lists the names it reads)"
    )


def _is_sequential(module: Any) -> bool:
    from ._math import _nn as mnn

    return isinstance(module, mnn.Sequential)
