"""Spectra of curvature operators against dense eigvalsh in float64."""

import numpy as np
import pytest
import torch

from curvlab.curvature.blocks import partition
from curvlab.curvature.operators import ggn, hessian
from curvlab.errors import CurvlabError
from curvlab.spectra import compute_spectra, exact_eigenvalues
from tests.conftest import make_batch, make_model


@pytest.mark.parametrize("make", [ggn, hessian])
def test_top_and_bottom_eigenvalues_match_eigvalsh(cfg, make):
    model, batch = make_model(cfg), make_batch(cfg)
    op = make(model, batch, "layer")
    D = op.to_dense()
    ev = torch.linalg.eigvalsh(D)
    top, = compute_spectra(op, ["full"], k=10, which="top", tol=1e-10)
    scale = ev.abs().max()
    assert torch.allclose(top.lanczos.eigenvalues, ev.flip(0)[:10], rtol=0, atol=1e-8 * scale)
    # bottom end on one block without a repeated zero eigenvalue (single-vector Lanczos finds one
    # copy of a repeated eigenvalue, and GPT's LayerNorms give most GGN blocks a null space)
    name = ("layers.1.mlp.down_proj.weight" if cfg.family == "llama"
            else "transformer.h.1.attn.c_attn.weight[16:24]")
    sub = make(model, batch, partition(model, [name]))
    evb = torch.linalg.eigvalsh(sub.to_dense())
    bottom, = compute_spectra(sub, ["full"], k=10, which="bottom", tol=1e-10)
    assert torch.allclose(bottom.lanczos.eigenvalues, evb[:10], rtol=0, atol=1e-8 * scale)


def test_blockdiag_spectrum_is_union_of_blocks(cfg):
    model, batch = make_model(cfg), make_batch(cfg)
    op = ggn(model, batch)
    bd, = compute_spectra(op, ["blockdiag"], k=5, tol=1e-10)
    union = torch.cat([torch.linalg.eigvalsh(op.block(n).to_dense())
                       for n in op.partition.names]).sort(descending=True).values
    assert torch.allclose(bd.lanczos.eigenvalues, union[:5], rtol=1e-9)


def test_density_and_trace(cfg):
    model, batch = make_model(cfg), make_batch(cfg)
    op = ggn(model, batch)
    true_trace = float(op.to_dense().trace())
    res, = compute_spectra(op, ["full"], k=0, density=True, probes=8, steps=40, trace=True,
                           trace_matvecs=300)
    sd = res.density
    grid = sd.grid(4000)
    values = sd.density(grid)
    assert abs(float(torch.trapezoid(values, grid)) - 1) < 1e-3
    # first moment of the density times n is the trace estimate; both near the true trace
    assert abs(sd.trace_estimate - true_trace) < 4 * sd.trace_stderr + 1e-9
    assert abs(res.trace.estimate - true_trace) < 4 * res.trace.stderr + 1e-9
    mean = float(torch.trapezoid(values * grid, grid))
    assert abs(mean * res.size - sd.trace_estimate) < 0.02 * abs(sd.trace_estimate)


def test_spectrum_errors(cfg):
    model, batch = make_model(cfg), make_batch(cfg)
    op = ggn(model, batch)
    n = op.partition.sizes[-1]
    with pytest.raises(CurvlabError, match="cannot compute"):
        compute_spectra(op, [op.partition.names[-1]], k=n + 1)
    with pytest.raises(CurvlabError, match="unknown block 'nope'"):
        compute_spectra(op, ["nope"], k=2)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(CurvlabError, match="NaN or Inf"):
        compute_spectra(ggn(model, batch), ["full"], k=2)


def test_exact_eigenvalues():
    a = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = a @ a.T
    assert np.allclose(exact_eigenvalues(a).numpy(), np.linalg.eigvalsh(a.numpy()))


def test_restarted_spectra_match_eigvalsh(cfg, tmp_path):
    model, batch = make_model(cfg), make_batch(cfg)
    op = ggn(model, batch, "layer")
    ev = torch.linalg.eigvalsh(op.to_dense()).flip(0)
    reports = []
    res, = compute_spectra(op, ["full"], k=5, tol=1e-11, basis_size=7, basis_device="disk",
                           scratch_dir=tmp_path, max_iter=2000,
                           progress=lambda t, r: reports.append((t, r)))
    assert res.lanczos.restarts > 0
    assert torch.allclose(res.lanczos.eigenvalues, ev[:5], rtol=0, atol=1e-10 * ev.abs().max())
    assert reports and all(t == "full" for t, _ in reports)
    assert reports[-1][1].converged == 5 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=-1), "--k must be >= 0"),
    (dict(k=0), "computes nothing"),
    (dict(k=3, basis_size=3), "--basis-size must be at least k'\\+1 = 4"),
    (dict(k=2, which="both", basis_size=4), "k'\\+1 = 5"),
    (dict(k=2, tol=0.0), "--tol"),
    (dict(k=2, max_iter=0), "--max-iter must be >= 1"),
    (dict(k=0, density=True, probes=0), "--probes must be >= 1"),
    (dict(k=0, density=True, steps=0), "--steps must be >= 1"),
    (dict(k=0, trace=True, trace_matvecs=2), "--trace-matvecs"),
    (dict(k=1, density=True, probe_block=0), "--probe-block"),
])
def test_spectrum_number_errors(cfg, kwargs, match):
    model, batch = make_model(cfg), make_batch(cfg)
    with pytest.raises(CurvlabError, match=match):
        compute_spectra(ggn(model, batch), ["full"], **kwargs)
