"""The CUDA source of the fused optimizer updates (``_fused.py`` launches them): an update rule
(:class:`_Update`: its arrays, scalars and body on one value), the rules of SGD and Adam, a rule
reading a sum of gradients in place of its gradient, and the kernels built from a rule: one value
a thread (cupy's elementwise kernel), eight 16-bit values per 16-byte load, and many leaves in one
launch.

The arithmetic rounds after each operation (``__fmul_rn`` and friends, which the compiler may not
contract into fused multiply-adds), so that float32 and float64 results equal the eager update's
bit for bit; 16-bit floats compute in float32 and round once on the store.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import cupy

__all__ = ["built", "sum_lines"]

_OPS = {
    "float": "#define MUL __fmul_rn\n#define ADD __fadd_rn\n#define DIV __fdiv_rn\n"
    "#define SQRT __fsqrt_rn\n",
    "double": "#define MUL __dmul_rn\n#define ADD __dadd_rn\n#define DIV __ddiv_rn\n"
    "#define SQRT __dsqrt_rn\n",
}

# the CUDA type and header of each 16-bit dtype
_HALF = {"float16": ("__half", "cuda_fp16.h"), "bfloat16": ("__nv_bfloat16", "cuda_bf16.h")}
_VEC = 8  # values of 2 bytes per 16-byte load


@dataclass(frozen=True)
class _Update:
    """One update rule as a kernel body: its array inputs and outputs, its float64 scalars."""

    name: str
    ins: tuple[str, ...]
    outs: tuple[str, ...]
    scalars: tuple[str, ...]
    body: str
    #: scalars read from a float64 array on the device (``dsc``), in this order
    device: tuple[str, ...] = ()

    def prologue(self) -> str:
        """The declarations of the device-read scalars, for the kernel's body."""
        return " ".join(f"const double {n} = dsc[{i}];" for i, n in enumerate(self.device))


@functools.cache
def _sgd_rule(
    weight_decay: bool, momentum: int, nesterov: bool, damp: bool, on_device: bool = False
) -> _Update:
    # momentum: 0 none, 1 first step (the buffer starts as d), 2 later steps; on_device: the
    # learning rate (negated, ``nlr``) read from the device scalars' array
    body = ["C p_ = (C)p; C d = (C)g;"]
    if weight_decay:
        body.append("d = ADD(MUL(p_, (C)wd), d);")
    if momentum == 0:
        body.append("out = (T)ADD(MUL(d, (C)nlr), p_);")
        outs: tuple[str, ...] = ("out",)
    else:
        if momentum == 1:
            body.append("C b = d;")
        elif damp:
            body.append("C b = ADD(MUL((C)buf, (C)mom), MUL(d, (C)omd));")
        else:
            body.append("C b = ADD(MUL((C)buf, (C)mom), d);")
        if nesterov:
            body.append("out = (T)ADD(MUL(ADD(MUL(b, (C)mom), d), (C)nlr), p_);")
        else:
            body.append("out = (T)ADD(MUL(b, (C)nlr), p_);")
        body.append("buf_out = (T)b;")
        outs = ("out", "buf_out")
    ins = ("p", "g") + (("buf",) if momentum == 2 else ())
    name = f"asyncnn_sgd_{int(weight_decay)}{momentum}{int(nesterov)}{int(damp)}"
    if on_device:
        return _Update(f"{name}d", ins, outs, ("wd", "mom", "omd"), "\n".join(body), ("nlr",))
    return _Update(name, ins, outs, ("nlr", "wd", "mom", "omd"), "\n".join(body))


@functools.cache
def _adam_rule(coupled: bool, decoupled: bool, amsgrad: bool, on_device: bool) -> _Update:
    body = ["C p_ = (C)p; C g_ = (C)g;"]
    if coupled:
        body.append("g_ = ADD(MUL(p_, (C)wd), g_);")
    body += [
        "C m = ADD(MUL((C)ea, (C)b1), MUL(g_, (C)omb1));",
        "C v = ADD(MUL((C)eas, (C)b2), MUL(MUL(g_, g_), (C)omb2));",
    ]
    second = "v"
    if amsgrad:
        body.append("C vmax = (C)mx > v ? (C)mx : v; max_out = (T)vmax;")
        second = "vmax"
    body += [
        f"C denom = ADD(DIV(SQRT({second}), (C)bc2), (C)eps);",
        "C delta = MUL(DIV(m, denom), (C)nss);",
        "out = (T)ADD(MUL(p_, (C)decay), delta);" if decoupled else "out = (T)ADD(delta, p_);",
        "ea_out = (T)m; eas_out = (T)v;",
    ]
    ins = ("p", "g", "ea", "eas") + (("mx",) if amsgrad else ())
    outs = ("out", "ea_out", "eas_out") + (("max_out",) if amsgrad else ())
    stepwise = ("bc2", "nss", "decay")  # what adam_step_scalars gives
    scalars = ("wd", "b1", "omb1", "b2", "omb2", "eps")
    name = f"asyncnn_adam_{int(coupled)}{int(decoupled)}{int(amsgrad)}{int(on_device)}"
    if on_device:
        return _Update(name, ins, outs, scalars, "\n".join(body), stepwise)
    return _Update(name, ins, outs, scalars + stepwise, "\n".join(body))


def sum_lines(names: tuple[str, ...], scale: str, out: str) -> str:
    """Kernel lines writing ``((names[0] + names[1]) + ...) * scale`` into ``out`` (declared by
    the caller, of type ``T``): added left to right in ``C``, each operation rounded, the scale
    rounded to ``C`` as cupy rounds a Python float multiplying an array of that type."""
    lines = f"C t_ = (C){names[0]};\n" + "".join(f"t_ = ADD(t_, (C){n});\n" for n in names[1:])
    return lines + f"{out} = (T)MUL(t_, (C){scale});"


@functools.cache
def _summed_rule(rule: _Update, count: int) -> _Update:
    """``rule`` reading ``count`` arrays ``g0, g1, ...`` and a scalar ``gscale`` in place of its
    gradient ``g``, their scaled sum."""
    at = rule.ins.index("g")
    terms = tuple(f"g{k}" for k in range(count))
    ins = rule.ins[:at] + terms + rule.ins[at + 1 :]
    body = f"T g;\n{{ {sum_lines(terms, 'gscale', 'g')} }}\n{rule.body}"
    return _Update(f"{rule.name}_sum{count}", ins, rule.outs, (*rule.scalars, "gscale"), body,
                   rule.device)  # fmt: skip


@functools.cache
def _elementwise(rule: _Update, ctype: str) -> Any:
    dsc = ["raw float64 dsc"] if rule.device else []
    ins = ", ".join([f"T {n}" for n in rule.ins] + dsc + [f"float64 {s}" for s in rule.scalars])
    outs = ", ".join(f"T {n}" for n in rule.outs)
    pre = _OPS[ctype] + f"typedef {ctype} C;\n"
    body = rule.prologue() + "\n" + rule.body
    return cupy.ElementwiseKernel(ins, outs, body, f"{rule.name}_{ctype}", preamble=pre)


def _lanes(rule: _Update, load: str, store: str) -> str:
    """The rule on one value: its inputs loaded (``load``, a format of the array's name ``n``),
    its outputs stored (``store``)."""
    ins = " ".join(f"T {n} = {load.format(n=n)};" for n in rule.ins)
    outs = " ".join(f"T {n};" for n in rule.outs)
    back = " ".join(store.format(n=n) for n in rule.outs)
    return f"{{ {ins} {outs}\n{rule.body}\n{back} }}"


def _values_at_i(rule: _Update, vec: int) -> str:
    """A kernel loop's body for the ``vec`` values from ``i`` of arrays ``{name}_a`` of ``n``
    values: one 16-byte load and store of each array for 8 16-bit values (the tail one value
    at a time), or the one value at ``i``."""
    if vec == 1:
        return _lanes(rule, "{n}_a[i]", "{n}_a[i] = {n};")
    vec_in = " ".join(
        f"uint4 {n}_v = *reinterpret_cast<const uint4*>({n}_a + i); "
        f"const T* {n}_l = reinterpret_cast<const T*>(&{n}_v);"
        for n in rule.ins
    )
    vec_out = " ".join(f"uint4 {n}_v; T* {n}_l = reinterpret_cast<T*>(&{n}_v);" for n in rule.outs)
    vec_store = " ".join(f"*reinterpret_cast<uint4*>({n}_a + i) = {n}_v;" for n in rule.outs)
    return f"""if (i + {vec} <= n) {{
      {vec_in} {vec_out}
      #pragma unroll
      for (int l = 0; l < {vec}; ++l)
        {_lanes(rule, "{n}_l[l]", "{n}_l[l] = {n};")}
      {vec_store}
    }} else {{
      for (long long k = i; k < n; ++k)
        {_lanes(rule, "{n}_a[k]", "{n}_a[k] = {n};")}
    }}"""


def built(kernel: Any) -> Any:
    """``kernel`` (a raw kernel) compiled, or None where it does not build here (no CUDA
    headers, say): the caller's array or elementwise path then serves."""
    try:
        kernel.compile()
    except Exception:  # noqa: BLE001 - whatever stops the build, the other path serves
        return None
    return kernel


@functools.cache
def _vectorised(rule: _Update, dtype_name: str) -> Any:
    """The rule for a 16-bit dtype, eight values per thread and load; None where it won't build."""
    ctype, header = _HALF[dtype_name]
    arrays = [f"const T* {n}_a" for n in rule.ins]
    arrays += [f"T* {n}_a" for n in rule.outs]  # may alias an input (in place)
    arrays += ["const double* dsc"] if rule.device else []
    params = ", ".join(arrays + [f"double {s}" for s in rule.scalars] + ["long long n"])
    source = f"""#include <{header}>
typedef {ctype} T;
typedef float C;
{_OPS["float"]}
extern "C" __global__ void {rule.name}_{dtype_name}_x8({params}) {{
  {rule.prologue()}
  long long stride = (long long)gridDim.x * blockDim.x * {_VEC};
  for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * {_VEC}; i < n;
       i += stride) {{
    {_values_at_i(rule, _VEC)}
  }}
}}
"""
    # None: the elementwise kernel serves
    return built(cupy.RawKernel(source, f"{rule.name}_{dtype_name}_x8"))


@functools.cache
def _multi(rule: _Update, dtype_name: str, count: int, vec: int) -> Any:
    """The rule over ``count`` leaves of ``dtype_name`` in one kernel, ``vec`` values per thread
    and load (8 for aligned 16-bit floats, else 1); None where it won't build."""
    if dtype_name in _HALF:
        ctype, header = _HALF[dtype_name]
        head, compute = f"#include <{header}>", "float"
    else:
        ctype = compute = "double" if dtype_name == "float64" else "float"
        head = ""
    arrays = rule.ins + rule.outs
    params: list[str] = []
    for k in range(count):
        params += [f"const T* {n}_{k}" for n in rule.ins] + [f"T* {n}_{k}" for n in rule.outs]
        params += [f"long long n_{k}", f"int b_{k}"]
    params += [f"int b_{count}"] + (["const double* dsc"] if rule.device else [])
    params += [f"double {s}" for s in rule.scalars]
    # each block works on one leaf: the last whose first block it is at or past
    find = " ".join(f"if (blk >= b_{k}) j = {k};" for k in range(1, count))
    cases = " ".join(
        f"case {k}: "
        + " ".join(f"{n}_a = {n}_{k};" for n in arrays)
        + f" n = n_{k}; first = b_{k}; next = b_{k + 1}; break;"
        for k in range(count)
    )
    decl = " ".join(f"const T* {n}_a;" for n in rule.ins) + " "
    decl += " ".join(f"T* {n}_a;" for n in rule.outs)
    name = f"{rule.name}_{dtype_name}_many{count}_x{vec}"
    source = f"""{head}
typedef {ctype} T;
typedef {compute} C;
{_OPS[compute]}
extern "C" __global__ void {name}({", ".join(params)}) {{
  {rule.prologue()}
  const int blk = blockIdx.x;
  int j = 0;
  {find}
  {decl}
  long long n = 0; int first = 0, next = 0;
  switch (j) {{ {cases} }}
  long long stride = (long long)(next - first) * blockDim.x * {vec};
  for (long long i = ((long long)(blk - first) * blockDim.x + threadIdx.x) * {vec}; i < n;
       i += stride) {{
    {_values_at_i(rule, vec)}
  }}
}}
"""
    return built(cupy.RawKernel(source, name))  # None: the leaves go one by one
