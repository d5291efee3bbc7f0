"""Float64 that is float64: a forward pass in which no floating-point operation runs below it.

Models cast to float32 inside their forward whatever their parameters' dtype: Hugging Face
norms compute ``x.to(torch.float32)``, eager attention ``softmax(..., dtype=torch.float32)``,
rotary embeddings build their tables from ``position_ids.float()`` and buffers computed at
construction in float32. Replacing such modules by class name is a guess (Gemma's RMSNorm is
``(1 + w) · x̂``, Cohere's rotary tables are interleaved). Instead, :func:`float64_computation`
runs the model's *own* code under a :class:`torch.overrides.TorchFunctionMode` that keeps the
computation in float64:

- every floating dtype below float64 named in a call (``x.to(torch.float32)``, ``x.float()``,
  ``softmax(x, dtype=torch.float32)``, ``torch.arange(n, dtype=torch.float)``) is float64
  (complex64: complex128);
- factories without a dtype (``torch.tensor(0.5)``, ``torch.ones(n)``) make float64: the
  default dtype is float64 inside the context.

Values computed *before* the forward (buffers a constructor filled in float32) are another
matter: :func:`recompute_buffers` rebuilds non-persistent buffers by running the module's own
constructor under the same context. :class:`LowPrecisionSpy` (a ``TorchDispatchMode``) counts
the ATen operations that touch a floating tensor below float64: zero is the proof.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

_WIDER = {torch.float32: torch.float64, torch.float16: torch.float64,
          torch.bfloat16: torch.float64, torch.complex64: torch.complex128}
_NARROWING_METHODS = {torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16}
_LOW = frozenset(_WIDER)


def _widen(x: Any) -> Any:
    return _WIDER.get(x, x) if isinstance(x, torch.dtype) else x


class Float64Mode(TorchFunctionMode):
    """Every floating dtype below float64 named in a torch call becomes float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _NARROWING_METHODS:
            self_ = args[0]
            return self_ if self_.dtype == torch.float64 else torch.Tensor.double(self_)
        if func in (torch.Tensor.to, torch.Tensor.type_as):
            args = args[:1] + tuple(_widen_target(a) for a in args[1:])
        args = tree_map(_widen, args)
        kwargs = tree_map(_widen, kwargs)
        return func(*args, **kwargs)


def _widen_target(x: Any) -> Any:
    """``t.to(other)`` / ``t.type_as(other)`` with a low-precision ``other``: its float64 twin
    (same device; only the dtype of ``other`` is read)."""
    if isinstance(x, torch.Tensor) and x.dtype in _LOW:
        return torch.empty((), dtype=_WIDER[x.dtype], device=x.device)
    return x


@contextlib.contextmanager
def float64_computation() -> Iterator[None]:
    """Run the enclosed torch code in float64 (see the module docstring)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with Float64Mode():
            yield
    finally:
        torch.set_default_dtype(old)


def _is_low(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in _LOW


class LowPrecisionSpy(TorchDispatchMode):
    """Counts ATen operations with a floating (or complex) input or output below float64.

    ``ops`` maps operator names (``aten.mul``) to counts; empty after a float64-pure forward.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = tree_flatten((args, kwargs or {}))[0] + tree_flatten(out)[0]
        if any(_is_low(x) for x in flat):
            self.ops[str(func.overloadpacket)] += 1
        return out

    def summary(self, limit: int = 4) -> str:
        top = ", ".join(f"{name} x{n}" for name, n in self.ops.most_common(limit))
        return f"{sum(self.ops.values())} operations below float64 ({top})"


def recompute_buffers(model: torch.nn.Module, build: Any) -> list[str]:
    """Replace ``model``'s non-persistent floating buffers by the float64 values that its own
    constructor computes under :func:`float64_computation`.

    ``build()`` constructs a fresh model of the same class and configuration (parameters are
    allocated on the meta device: nothing but the buffers is computed). Persistent buffers and
    parameters come from a checkpoint and are left alone. Returns the names replaced.
    """
    persistent = set(model.state_dict(keep_vars=True))
    with float64_computation(), _parameters_on_meta():
        fresh = build()
    fresh_buffers = dict(fresh.named_buffers())
    replaced = []
    for name, buf in list(model.named_buffers()):
        if name in persistent or not buf.is_floating_point() and not buf.is_complex():
            continue
        new = fresh_buffers.get(name)
        if new is None or new.shape != buf.shape or new.device.type == "meta":
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._buffers[leaf] = new.to(device=buf.device)
        replaced.append(name)
    return replaced


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Module construction with every parameter moved to the meta device as it is registered
    (buffers stay real): builds a model's buffers without materializing its weights."""
    original = torch.nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original
