"""Operators that `torch.compile` treats as one opaque call: the packed and streamed products of
a compiled decoding step (`minirm.packed`, `minirm.streamed`, `minirm.graphs`).

Inductor cannot trace a ctypes call, and its own lowerings of MKL's and oneDNN's packed products
accept only weights that it packed itself, so these products enter a compiled step as custom
operators of the `minirm` namespace: a schema, a kernel (the plain Python call) and a fake
kernel that gives the output's shape while tracing.

They are registered on a `torch.library.Library` directly rather than with the
`torch.library.custom_op` decorator. The decorator's wrapper switches dynamo's frame hook off
and on again around every call, and inside a compiled SmolLM2-135M step of 8 rows that cost
~80 us a call: with the 121 products of a step replaced by zeros, the step took 15.7-17.4 ms
through the decorator and 5.8-6.1 ms registered here (Xeon, 2 cores); the real step took 54.6
and 44.6-45.8 ms.
"""

import torch

_LIB = torch.library.Library("minirm", "DEF")


def opaque(name: str, schema: str, kernel, fake):
    """Define `minirm::name` with `schema` (its arguments and result, as in
    "(Tensor x, Tensor w) -> Tensor"), run by `kernel` and shaped by `fake`
    while tracing; returns the operator."""
    _LIB.define(name + schema)
    # For every backend, MkldnnCPU included: a packed oneDNN weight is a tensor of that kind.
    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"minirm::{name}", fake, lib=_LIB)
    return getattr(torch.ops.minirm, name).default
