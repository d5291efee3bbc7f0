"""Coupling map: the Frobenius norm ``F_rc = ||C_rc||_F`` of every block of a curvature matrix.

For each column block c one batch of products with the operator restricted to (all rows) x
(block c) gives every ``C_rc`` at once:

- exact, when ``n_c <= exact_max``: products with the n_c identity columns, so
  ``F_rc² = Σ C_rc[i, j]²``;
- otherwise randomized: ``F_rc² = E ||C_rc z||²`` for z with independent entries of mean 0 and
  variance 1 (Rademacher by default, or Gaussian). With s probes ``y_k = ||C_rc z_k||²`` the
  estimate is ``m = mean(y)`` with standard error ``sqrt(var(y) / s)`` (sample variance); the
  norm is ``sqrt(m)`` with the delta-method standard error ``se(m) / (2 sqrt(m))``.

For a symmetric curvature (all of ggn, hessian, efisher, mcfisher) ``F_rc = F_cr``: an entry
is exact when either of its blocks is small, two randomized estimates of the same pair are
averaged (``m = (m_rc + m_cr)/2``, ``se² = (se_rc² + se_cr²)/4``), and the map is symmetric.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from curvlab.curvature.extract import Progress, identity_columns, sub_operator
from curvlab.curvature.operators import CurvatureOperator
from curvlab.errors import ConfigError

DISTRIBUTIONS = ("rademacher", "gaussian")


@dataclass(frozen=True)
class CouplingMap:
    """Frobenius norms ``frobenius[r, c] = ||C_rc||_F`` (float64 [b, b]), their standard
    errors (0 where ``exact``), and how they were computed."""

    names: tuple[str, ...]
    frobenius: torch.Tensor
    stderr: torch.Tensor
    exact: torch.Tensor
    kind: str = ""
    probes: int = 0
    seed: int = 0
    exact_max: int = 0
    distribution: str = "rademacher"

    def off_diagonal_energy(self) -> float:
        """``||C − blockdiag(C)||_F / ||C||_F = sqrt(Σ_{r≠c} F_rc²) / sqrt(Σ_{r,c} F_rc²)``."""
        sq = self.frobenius.double() ** 2
        total = float(sq.sum())
        return 0.0 if total == 0 else float((sq.sum() - sq.diagonal().sum()) / total) ** 0.5


def _probes(n: int, s: int, distribution: str, generator: torch.Generator) -> torch.Tensor:
    if distribution == "rademacher":
        return torch.randint(0, 2, (n, s), generator=generator, dtype=torch.float64) * 2 - 1
    return torch.randn(n, s, generator=generator, dtype=torch.float64)


def coupling_products(sizes: list[int], exact_max: int = 256, probes: int = 64,
                      skip: Collection[int] = ()) -> int:
    """Number of column products :func:`coupling_map` runs for blocks of ``sizes`` (``skip``:
    column blocks whose norms are all known, see :func:`known_columns`)."""
    return sum(n if n <= exact_max else probes for c, n in enumerate(sizes) if c not in skip)


def _known_column(names: Sequence[str], c: int, known: Mapping[tuple[str, str], float],
                  symmetric: bool) -> list[float] | None:
    out = []
    for r in names:
        value = known.get((r, names[c]))
        if value is None and symmetric:
            value = known.get((names[c], r))
        if value is None:
            return None
        out.append(float(value))
    return out


def known_columns(names: Sequence[str], known: Mapping[tuple[str, str], float] | None,
                  symmetric: bool = True) -> set[int]:
    """Column blocks c whose ``||C_rc||_F²`` are all in ``known`` (for a symmetric operator
    ``(c, r)`` counts too): :func:`coupling_map` needs no product for them."""
    if not known:
        return set()
    return {c for c in range(len(names)) if _known_column(names, c, known, symmetric) is not None}


def coupling_map(
    op: CurvatureOperator,
    *,
    exact_max: int = 256,
    probes: int = 64,
    seed: int = 0,
    distribution: str = "rademacher",
    chunk_cols: int = 64,
    product_chunk: int | None = 32,
    symmetric: bool = True,
    progress: Progress | None = None,
    known: Mapping[tuple[str, str], float] | None = None,
) -> CouplingMap:
    """The coupling map of ``op`` over ``op.partition`` (see the module docstring).

    Costs ``Σ_c (n_c if n_c <= exact_max else probes)`` column products. ``seed`` fixes the
    probes (drawn in float64 on the CPU, column block after column block). ``symmetric``
    uses ``F_rc = F_cr``; set it False for a non-symmetric operator. ``known``: exact
    ``||C_rc||_F²`` by (row, col) name, e.g. of dense blocks already extracted; a column block
    whose norms are all known costs no product (the probes of the others are unchanged).
    """
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"unknown probe distribution {distribution!r}; expected "
                          f"{' or '.join(DISTRIBUTIONS)}")
    if probes < 2:
        raise ConfigError("a randomized coupling estimate needs at least 2 probes")
    names, sizes = op.partition.names, op.partition.sizes
    b = len(names)
    small = [n <= exact_max for n in sizes]
    est = torch.zeros(b, b, dtype=torch.float64)  # estimates of F²
    var = torch.zeros(b, b, dtype=torch.float64)  # their variances
    exact = torch.zeros(b, b, dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    for c, name in enumerate(names):
        stored = _known_column(names, c, known, symmetric) if known else None
        if stored is not None:
            est[:, c] = torch.tensor(stored, dtype=torch.float64)
            exact[:, c] = True
            if not small[c]:  # keep the probe stream of the later blocks unchanged
                _probes(sizes[c], probes, distribution, generator)
            continue
        if small[c]:
            sub = sub_operator(op, names, [name])
            for a in range(0, sizes[c], chunk_cols):
                z = min(sizes[c], a + chunk_cols)
                y = sub.matmat(identity_columns(sizes[c], a, z, op.dtype, op.device),
                               product_chunk)
                for r, piece in enumerate(torch.split(y.double().cpu(), sizes)):
                    est[r, c] += piece.square().sum()
                if progress is not None:
                    progress(z - a)
            exact[:, c] = True
            continue
        rows = [r for r in range(b) if not (symmetric and small[r])]  # c itself is one
        sub = sub_operator(op, [names[r] for r in rows], [name])
        y = sub.matmat(_probes(sizes[c], probes, distribution, generator), product_chunk)
        for r, piece in zip(rows, torch.split(y.double().cpu(), [sizes[r] for r in rows])):
            sq = piece.square().sum(0)  # ||C_rc z_k||², k = 1..s
            est[r, c], var[r, c] = sq.mean(), sq.var() / probes
        if progress is not None:
            progress(probes)
    if symmetric:
        est, var, exact = _symmetrize(est, var, exact)
    frob = est.clamp(min=0).sqrt()
    stderr = torch.where(exact | (frob == 0), torch.zeros_like(frob),
                         var.sqrt() / (2 * frob.clamp(min=torch.finfo(torch.float64).tiny)))
    return CouplingMap(tuple(names), frob, stderr, exact, op.kind, probes, seed, exact_max,
                       distribution)


def _symmetrize(est: torch.Tensor, var: torch.Tensor, exact: torch.Tensor):
    """Use ``F_rc = F_cr``: an exact entry wins over an estimate; two exact values (equal up to
    round-off) or two estimates of an off-diagonal pair are averaged."""
    same = exact == exact.T
    est = torch.where(same, (est + est.T) / 2, torch.where(exact, est, est.T))
    both = ~exact & ~exact.T & ~torch.eye(len(est), dtype=torch.bool)
    var = torch.where(both, (var + var.T) / 4, var)
    exact = exact | exact.T
    return est, torch.where(exact, 0.0, var), exact
