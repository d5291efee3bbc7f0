"""Custom ``torch.autograd.Function``s inside a model, run through their differentiable forward.

A custom Function (Bloom's GeLU, fused kernels written in Python) has a hand-written backward
and usually no ``jvp``: forward-mode AD and ``torch.func`` transforms fail on it, and double
backward differentiates the hand-written backward, not the function. curvlab differentiates
the function itself: inside :func:`unrolled`, ``F.apply(*args)`` of a class in the given set
runs ``F.forward`` directly (a stand-in ``ctx``), so autograd records the forward's own torch
operations and every derivative, of any order and mode, is a derivative of the forward.

That is equivalent only if the hand-written backward is the derivative of the forward;
:func:`validate` checks it on the inputs the model really passes (its first vector-Jacobian
product against autograd through the forward) and a class that fails, or whose forward is not
made of differentiable torch operations, is refused with the module that calls it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import Function, _is_setup_context_defined

_state = threading.local()
_ORIGINAL_APPLY = Function.apply.__func__  # the classmethod's function


class _Ctx:
    """Stand-in for the ``ctx`` of ``Function.forward`` when it is run directly."""

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.needs_input_grad = tuple(isinstance(a, torch.Tensor) and a.requires_grad
                                      for a in args)
        self.saved_tensors: tuple[torch.Tensor, ...] = ()

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        self.saved_tensors = tensors

    def mark_dirty(self, *args: Any) -> None:
        pass

    def mark_non_differentiable(self, *args: Any) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


def run_forward(cls: type[Function], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``cls.forward`` evaluated with autograd recording its operations."""
    if _is_setup_context_defined(cls.setup_context):
        return cls.forward(*args, **kwargs)
    return cls.forward(_Ctx(args), *args, **kwargs)


@dataclass
class Call:
    """One custom Function call seen in a forward pass."""

    cls: type[Function]
    module: str  # qualified name of the innermost module running when it was called
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _apply(cls, *args, **kwargs):
    unroll = getattr(_state, "unroll", None)
    record = getattr(_state, "record", None)
    if record is not None:
        stack = getattr(_state, "modules", None) or ["<model>"]
        record.append(Call(cls, stack[-1], args, kwargs))
    if unroll is not None and cls in unroll:
        return run_forward(cls, args, kwargs)
    return _ORIGINAL_APPLY(cls, *args, **kwargs)


@contextlib.contextmanager
def _patched(attr: str, value: Any) -> Iterator[None]:
    depth = getattr(_state, "depth", 0)
    previous = getattr(_state, attr, None)
    setattr(_state, attr, value)
    if depth == 0:
        Function.apply = classmethod(_apply)
    _state.depth = depth + 1
    try:
        yield
    finally:
        _state.depth = depth
        setattr(_state, attr, previous)
        if depth == 0:
            Function.apply = classmethod(_ORIGINAL_APPLY)


def unrolled(classes: frozenset[type[Function]]) -> contextlib.AbstractContextManager[None]:
    """Inside this context, ``cls.apply`` of every class in ``classes`` runs its forward."""
    if not classes:
        return contextlib.nullcontext()
    return _patched("unroll", classes)


@contextlib.contextmanager
def recording(model: torch.nn.Module) -> Iterator[list[Call]]:
    """Record every custom Function call of ``model``'s forward passes with the module that
    makes it."""
    calls: list[Call] = []
    _state.modules = []
    names = {id(m): n or "<model>" for n, m in model.named_modules()}

    def push(module, args):
        _state.modules.append(names.get(id(module), type(module).__name__))

    def pop(module, args, output):
        if _state.modules:
            _state.modules.pop()

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(push))
        handles.append(m.register_forward_hook(pop, always_call=True))
    try:
        with _patched("record", calls):
            yield calls
    finally:
        for h in handles:
            h.remove()
        _state.modules = []


class CustomFunctionError(Exception):
    """A custom Function that curvlab cannot run through its forward (message: why)."""


def validate(call: Call, rtol: float) -> float:
    """Relative difference between ``call.cls``'s hand-written backward and autograd through
    its forward, on the call's own inputs and a fixed random cotangent. Raises
    :class:`CustomFunctionError` when the forward cannot be differentiated or the values
    differ."""
    name = f"{call.cls.__module__}.{call.cls.__qualname__}"

    def leaves():
        return tuple(a.detach().clone().requires_grad_(a.is_floating_point())
                     if isinstance(a, torch.Tensor) else a for a in call.args)

    inputs_ref, inputs_new = leaves(), leaves()
    diff_ref = [a for a in inputs_ref if isinstance(a, torch.Tensor) and a.requires_grad]
    diff_new = [a for a in inputs_new if isinstance(a, torch.Tensor) and a.requires_grad]
    with torch.enable_grad():
        out_ref = _ORIGINAL_APPLY(call.cls, *inputs_ref, **call.kwargs)
        try:
            out_new = run_forward(call.cls, inputs_new, call.kwargs)
        except Exception as e:
            raise CustomFunctionError(f"{name}: its forward cannot run outside autograd.Function "
                                      f"({type(e).__name__}: {str(e).splitlines()[0][:80]})"
                                      ) from None
        outs_ref = [o for o in _tensors(out_ref) if o.is_floating_point()]
        outs_new = [o for o in _tensors(out_new) if o.is_floating_point()]
        if len(outs_ref) != len(outs_new) or not outs_new:
            raise CustomFunctionError(f"{name}: its forward returns no floating-point tensors")
        value_err = max(_rel(a, b) for a, b in zip(outs_new, outs_ref))
        if value_err > rtol:
            raise CustomFunctionError(f"{name}: its forward run directly differs from apply "
                                      f"(relative {value_err:.1e})")
        if not all(o.requires_grad for o in outs_new):
            raise CustomFunctionError(f"{name}: its forward is not made of differentiable torch "
                                      "operations")
        gen = torch.Generator().manual_seed(0)
        cot = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device)
               for o in outs_ref]
        g_ref = torch.autograd.grad(outs_ref, diff_ref, cot, allow_unused=True)
        g_new = torch.autograd.grad(outs_new, diff_new, cot, allow_unused=True)
    err = 0.0
    for a, b in zip(g_new, g_ref):
        a = torch.zeros(()) if a is None else a
        b = torch.zeros(()) if b is None else b
        err = max(err, _rel(a, b))
    if err > rtol:
        raise CustomFunctionError(f"{name}: its backward is not the derivative of its forward "
                                  f"(relative difference {err:.1e})")
    return err


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [o for o in out if isinstance(o, torch.Tensor)]
    return []


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
