"""What :mod:`curvlab.linalg` calls an operator, and the helpers that check and apply one.

An operator is any object with ``shape == (n, n)``, a floating ``dtype``, a ``device`` and
``op @ v`` for ``v`` of shape ``(n,)`` (returning ``(n,)``) and ``op @ V`` for ``V`` of shape
``(n, k)`` (returning ``(n, k)``, a *block* product that may be much cheaper than ``k`` single
products). The algorithms assume the operator is symmetric (Lanczos, SLQ, CG) or at least square
(trace estimators); they never look inside it. A square :class:`torch.Tensor` is wrapped by
:func:`as_operator`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Operator(Protocol):
    """Structural type of a linear operator ``A: R^n -> R^n`` (see the module docstring)."""

    shape: Any
    dtype: torch.dtype
    device: torch.device

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor: ...


class DenseOperator:
    """A dense square matrix seen as an operator: ``op @ V == matrix @ V``."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matrix @ other

    def __repr__(self) -> str:
        return f"DenseOperator(shape={self.shape}, dtype={self.dtype}, device={self.device})"


def check_operator(op: Any) -> int:
    """Check that ``op`` is a square floating-point operator and return its dimension ``n``.

    Raises ``TypeError`` when ``op`` lacks ``shape``/``dtype``/``device``/``@`` and ``ValueError``
    (one-line message) for a shape that is not ``(n, n)`` with ``n >= 1`` or a non-floating dtype.
    """
    missing = [a for a in ("shape", "dtype", "device", "__matmul__") if not hasattr(op, a)]
    if missing:
        raise TypeError(f"not an operator: {type(op).__name__} has no {', '.join(missing)}")
    shape = tuple(op.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"operator must be square (n, n), got shape {shape}")
    if shape[0] < 1:
        raise ValueError("operator has dimension 0")
    if not (isinstance(op.dtype, torch.dtype) and op.dtype.is_floating_point):
        raise ValueError(f"operator dtype must be a real floating type, got {op.dtype}")
    return int(shape[0])


def as_operator(x: Any) -> Operator:
    """Return ``x`` as an operator: a tensor is wrapped in :class:`DenseOperator`, an object with
    ``shape``/``dtype``/``device``/``@`` passes through unchanged. Both are checked with
    :func:`check_operator`."""
    op = DenseOperator(x) if isinstance(x, torch.Tensor) else x
    check_operator(op)
    return op


def matmat(op: Operator, V: torch.Tensor) -> torch.Tensor:
    """``op @ V`` for ``V`` of shape ``(n, k)``: one block product (a vector product if ``k == 1``).

    Raises ``ValueError`` if the operator returns the wrong shape.
    """
    out = (op @ V[:, 0]).unsqueeze(1) if V.shape[1] == 1 else op @ V
    if tuple(out.shape) != tuple(V.shape):
        raise ValueError(f"operator returned shape {tuple(out.shape)} for input {tuple(V.shape)}")
    return out


def random_probes(
    op: Operator, k: int, generator: torch.Generator, distribution: str = "rademacher"
) -> torch.Tensor:
    """``k`` random columns of shape ``(n, k)`` in ``op``'s dtype, on ``op``'s device.

    ``"rademacher"``: entries ±1; ``"gaussian"``: standard normal entries; either way
    ``E[z zᵀ] = I``. Drawn on the CPU from ``generator`` (a CPU generator) and then moved, so a
    seed gives the same probes on every device.
    """
    size = (op.shape[0], k)
    if distribution == "rademacher":
        z = torch.randint(0, 2, size, generator=generator, dtype=op.dtype).mul_(2).sub_(1)
    elif distribution == "gaussian":
        z = torch.randn(size, generator=generator, dtype=op.dtype)
    else:
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    return z.to(op.device)


class DiagonallyScaledOperator:
    """``D A D`` for a symmetric operator ``A`` and a diagonal ``D = diag(d)``: symmetric again.

    With ``d = p^{-1/2}`` its eigenvalues are those of ``P^{-1} A`` (``P = diag(p)``, ``p > 0``;
    similar matrices: ``P^{-1} A = D (D A D) D^{-1}``) and an eigenvector ``w`` of ``D A D`` gives
    the eigenvector ``D w`` of ``P^{-1} A``. ``op @ V`` is one block product of ``A``.
    """

    def __init__(self, op: Any, d: torch.Tensor) -> None:
        n = check_operator(op)
        if tuple(d.shape) != (n,):
            raise ValueError(f"scaling has shape {tuple(d.shape)}, operator dimension {n}")
        self.op = op
        self.d = d.to(device=op.device, dtype=op.dtype)

    shape = property(lambda self: tuple(self.op.shape))
    dtype = property(lambda self: self.op.dtype)
    device = property(lambda self: self.op.device)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        d = self.d if v.ndim == 1 else self.d[:, None]
        return d * (self.op @ (d * v))

    def __repr__(self) -> str:
        return f"DiagonallyScaledOperator({self.op!r})"
