"""Fused optimizer updates on cupy: one kernel per parameter leaf instead of 2 to 8 passes.

Each kernel reads the parameter, its gradient and its state buffers once and writes fresh
arrays (the optimizers stay functional: nothing is written in place). The arithmetic is the
eager update's, operation for operation, with rounding after each (``__fmul_rn`` and friends,
which the compiler may not contract into fused multiply-adds), so float32 and float64 results
equal the eager ones bit for bit. 16-bit floats (float16, bfloat16) compute in float32 and round
once on the store.

Imported only from the optimizers, on cupy arrays.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import cupy

__all__ = ["adam_leaf", "sgd_leaf"]

_OPS = {
    "float": "#define MUL __fmul_rn\n#define ADD __fadd_rn\n#define DIV __fdiv_rn\n"
    "#define SQRT __fsqrt_rn\n",
    "double": "#define MUL __dmul_rn\n#define ADD __dadd_rn\n#define DIV __ddiv_rn\n"
    "#define SQRT __dsqrt_rn\n",
}


def _compute_type(dtype: Any) -> str:
    return "double" if dtype == cupy.float64 else "float"


@functools.cache
def _sgd_kernel(ctype: str, weight_decay: bool, momentum: int, nesterov: bool, damp: bool) -> Any:
    # momentum: 0 none, 1 first step (the buffer starts as d), 2 later steps
    body = [f"{ctype} p_ = ({ctype})p; {ctype} d = ({ctype})g;"]
    if weight_decay:
        body.append("d = ADD(MUL(p_, (C)wd), d);")
    if momentum == 0:
        body.append("out = (T)ADD(MUL(d, (C)nlr), p_);")
        outs = "T out"
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
        outs = "T out, T buf_out"
    ins = "T p, T g" + (", T buf" if momentum == 2 else "")
    ins += ", float64 nlr, float64 wd, float64 mom, float64 omd"
    pre = _OPS[ctype] + f"typedef {ctype} C;\n"
    name = f"asyncnn_sgd_{ctype}_{int(weight_decay)}{momentum}{int(nesterov)}{int(damp)}"
    return cupy.ElementwiseKernel(ins, outs, "\n".join(body), name, preamble=pre)


def sgd_leaf(
    p: Any, g: Any, buf: Any, step: int, lr: float, momentum: float, dampening: float,
    weight_decay: float, nesterov: bool,
) -> tuple[Any, tuple[Any, ...]]:  # fmt: skip
    """One leaf of torch's SGD update in one kernel: ``(new_p, (new_buffer,) or ())``."""
    mode = 0 if momentum == 0.0 else (1 if step == 0 else 2)
    kernel = _sgd_kernel(
        _compute_type(p.dtype), weight_decay != 0.0, mode, nesterov, dampening != 0.0
    )
    args = (p, g) if mode != 2 else (p, g, buf)
    scalars = (-lr, weight_decay, momentum, 1.0 - dampening)
    if mode == 0:
        return kernel(*args, *scalars), ()
    out, new_buf = kernel(*args, *scalars)
    return out, (new_buf,)


@functools.cache
def _adam_kernel(ctype: str, coupled: bool, decoupled: bool, amsgrad: bool) -> Any:
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
    ins = "T p, T g, T ea, T eas" + (", T mx" if amsgrad else "")
    ins += ", float64 wd, float64 b1, float64 omb1, float64 b2, float64 omb2, float64 bc2"
    ins += ", float64 eps, float64 nss, float64 decay"
    outs = "T out, T ea_out, T eas_out" + (", T max_out" if amsgrad else "")
    pre = _OPS[ctype] + f"typedef {ctype} C;\n"
    name = f"asyncnn_adam_{ctype}_{int(coupled)}{int(decoupled)}{int(amsgrad)}"
    return cupy.ElementwiseKernel(ins, outs, "\n".join(body), name, preamble=pre)


def adam_leaf(
    p: Any, g: Any, buffers: tuple[Any, ...], step: int, lr: float, betas: tuple[float, float],
    eps: float, weight_decay: float, amsgrad: bool, decoupled: bool,
) -> tuple[Any, tuple[Any, ...]]:  # fmt: skip
    """One leaf of torch's Adam/AdamW update in one kernel: ``(new_p, new_buffers)``."""
    beta1, beta2 = betas
    t = step + 1
    coupled = weight_decay != 0.0 and not decoupled
    decay = 1.0 - lr * weight_decay if decoupled else 1.0
    kernel = _adam_kernel(_compute_type(p.dtype), coupled, decay != 1.0, amsgrad)
    args = (p, g, buffers[0], buffers[1]) + ((buffers[2],) if amsgrad else ())
    step_size = lr / (1.0 - beta1**t)
    outs = kernel(
        *args, weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2,
        math.sqrt(1.0 - beta2**t), eps, -step_size, decay,
    )  # fmt: skip
    return outs[0], tuple(outs[1:])
