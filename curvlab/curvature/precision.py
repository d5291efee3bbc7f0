"""How curvature products multiply (``precision``) and whether they are compiled (``compile``).

``precision`` names the arithmetic of the model evaluations inside one product (forward pass,
tangents, VJP); parameters, tangents in and products out keep the operator's dtype:

- ``"fp32"`` (default): the full precision of the parameters' dtype: IEEE float32 (or float64)
  matrix products. On CUDA TF32 is switched off for the products, whatever the process-wide
  setting (``torch.backends.cuda.matmul``), and restored afterwards.
- ``"tf32"``: float32 parameters; on CUDA the float32 matrix products run on tensor cores in
  TF32 (10-bit mantissa; about 1e-3 relative error per product). **A no-op on CPU**: PyTorch has
  no TF32 path there, so ``tf32`` gives the ``fp32`` numbers (nothing is changed on CPU, not even
  oneDNN's setting).
- ``"bf16"``: float32 parameters; the products run under ``torch.autocast(dtype=bfloat16)``:
  matrix products take bfloat16 inputs (8-bit mantissa; about 1e-2 relative error per product),
  the logits are cast back to float32 before the logit-space curvature ``H_z`` and the loss, and
  the product is returned in float32 (the casts' VJPs bring it back).

Forward-mode AD under bf16: autocast casts a tangent together with its primal (the JVP of the
cast), so ``J v`` is computed with bfloat16 matrix products too; the math attention kernel is
used as always (fused SDPA kernels have no forward-mode AD). Refused with a one-line
:class:`~curvlab.errors.ConfigError`: ``tf32``/``bf16`` with float64 parameters (autocast and
TF32 leave float64 untouched, so the option would silently do nothing).

Lanczos, SLQ, Hutch++ and CG run outside these contexts: their vectors stay in the operator's
dtype (never bfloat16) and their scalar recurrences (α, β, ``rᵀr``, ``pᵀAp``) in float64.

``compile``: ``torch.compile`` of the product closures (``True``: the default ``inductor``
backend; a string: that backend), one per batch of the operator: the first product traces the
closure into a graph of ATen operations (:class:`CompiledProduct`) and compiles it; later
products on that batch run the compiled graph. A closure whose tracing or compilation fails runs
eagerly from then on, after one :class:`CompileWarning`. Products inside ``vmap`` (vectorized
``matmat``) run eagerly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from curvlab.errors import ConfigError, CurvlabError

PRECISIONS = ("fp32", "tf32", "bf16")


class CompileWarning(UserWarning):
    """``torch.compile`` of a product closure failed; it runs eagerly."""


def check_precision(precision: str, dtype: torch.dtype) -> str:
    """``precision`` if it is valid for parameters of ``dtype``, else a :class:`ConfigError`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision != "fp32" and dtype != torch.float32:
        name = str(dtype).removeprefix("torch.")
        raise ConfigError(f"precision {precision} needs float32 parameters, got {name} "
                          "(TF32 and bfloat16 autocast leave float64 untouched); use "
                          "float32 or precision fp32")
    return precision


def _cuda_matmul_tf32(on: bool) -> Callable[[], None]:
    """Set TF32 for CUDA float32 matrix products; returns the function that restores it.

    Through ``allow_tf32``, which every reader accepts (torch 2.13: once ``fp32_precision`` is
    set, reading ``allow_tf32`` raises "mix of the legacy and new APIs", and PyTorch's own code
    still reads it); through ``fp32_precision`` only if the process already chose that API."""
    matmul = torch.backends.cuda.matmul
    try:
        old = matmul.allow_tf32
    except RuntimeError:  # TF32 was set through the new API: keep to it
        old_precision = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if on else "ieee"
        return lambda: setattr(matmul, "fp32_precision", old_precision)
    matmul.allow_tf32 = on
    return lambda: setattr(matmul, "allow_tf32", old)


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device | str) -> Iterator[None]:
    """The arithmetic of ``precision`` (module docstring) for products on ``device``."""
    device = torch.device(device)
    restore: Callable[[], None] | None = None
    if device.type == "cuda":
        restore = _cuda_matmul_tf32(precision == "tf32")
    try:
        if precision == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        if restore is not None:
            restore()


def in_transform() -> bool:
    """True inside a ``torch.func`` transform (``vmap``, ``grad``, ...)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


class CompiledProduct:
    """A product closure ``eager`` compiled on first use by ``torch.compile(backend=...)`` as
    one whole graph (``fullgraph``: a graph break counts as a failure). ``trace``: first trace
    ``eager`` with ``make_fx`` into a graph of plain ATen operations and compile that (for
    closures holding ``torch.func.vjp`` pullbacks, whose functorch-wrapped saved tensors
    ``torch.compile`` cannot trace; the saved tensors become constants of the graph).

    When tracing, compiling or running the compiled code raises, ``eager`` is used for good,
    after one :class:`CompileWarning` naming ``label`` (and ``on_failure`` is called once).
    Inside a ``torch.func`` transform (``vmap``) ``eager`` runs.
    """

    def __init__(self, eager: Callable[..., Any], backend: str, label: str, *,
                 trace: bool = False,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        self.eager, self.backend, self.label, self.trace = eager, backend, label, trace
        self.compiled: Callable[..., Any] | None = None
        self.failed = False
        self.on_failure = on_failure

    def __call__(self, *args: Any) -> Any:
        if self.failed or in_transform():
            return self.eager(*args)
        try:
            if self.compiled is None:
                fn = self.eager
                if self.trace:
                    from torch.fx.experimental.proxy_tensor import make_fx

                    fn = make_fx(self.eager)(*args)
                self.compiled = torch.compile(fn, backend=self.backend, dynamic=False,
                                              fullgraph=True)
            return self.compiled(*args)
        except CurvlabError:  # the product's own error (bad input): not a compile failure
            raise
        except Exception as e:  # any failure of make_fx/dynamo/inductor: eager from now on
            self.failed, self.compiled = True, None
            first = (str(e).strip().splitlines() or [""])[0][:160]
            warnings.warn(f"torch.compile failed for the {self.label} products "
                          f"({type(e).__name__}: {first}); running them eagerly",
                          CompileWarning, stacklevel=2)
            if self.on_failure is not None:
                self.on_failure(e)
            return self.eager(*args)


def compile_backend(compile: bool | str) -> str | None:
    """The ``torch.compile`` backend ``compile`` asks for (``True``: ``"inductor"``), or None."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "inductor"
    if isinstance(compile, str) and compile:
        return compile
    raise ConfigError(f"compile must be True, False or a torch.compile backend name, got "
                      f"{compile!r}")
