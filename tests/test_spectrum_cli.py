import h5py
import numpy as np
import torch

import curvlab
from curvlab.store.spectrum import read_spectra
from tests.cli_helpers import assert_clean_error, run_cli


def _ckpt(tmp_path, capsys):
    path = tmp_path / "m.pt"
    cfg = curvlab.ModelConfig("llama", vocab_size=256, seq_len=16, d_model=8, n_layers=2,
                              n_heads=2, d_ff=12)
    curvlab.save_checkpoint(path, curvlab.build_model(cfg), data={"seq_len": 8,
                                                                  "batch_size": 2})
    return path


def test_spectrum_cli_writes_results_and_plots(tmp_path, capsys):
    ckpt = _ckpt(tmp_path, capsys)
    out = tmp_path / "s.h5"
    code, stdout, _ = run_cli(capsys, "spectrum", ckpt, "--k", 3, "--blockdiag", "--density",
                              "--probes", 2, "--steps", 20, "--trace", "--dtype", "float64",
                              "-o", out, "--plot", tmp_path / "s.png")
    assert code == 0, stdout
    assert "full" in stdout and "blockdiag" in stdout and (tmp_path / "s.png").stat().st_size
    with h5py.File(out, "r") as f:
        spectra = read_spectra(f)
        assert f.attrs["checkpoint_sha256"] and f.attrs["dtype"] == "float64"
    full = spectra["ggn"]["full"]
    assert full["eigenvalues"].shape == (3,) and full["attrs"]["complete"]
    grid, values = full["density"]["grid"], full["density"]["values"]
    assert abs(np.trapezoid(values, grid) - 1) < 1e-2
    # the top eigenvalues equal a dense computation
    model, _ = curvlab.load_checkpoint(ckpt, dtype=torch.float64)
    batch = curvlab.data.analysis_batches(curvlab.DataSpec(seq_len=8, batch_size=2), 1)
    dense = curvlab.ggn(model, batch).to_dense()
    ev = torch.linalg.eigvalsh(dense).flip(0)[:3].numpy()
    assert np.allclose(full["eigenvalues"], ev, rtol=1e-5)
    code, stdout, _ = run_cli(capsys, "plot", out, "-o", tmp_path / "figs")
    assert code == 0 and (tmp_path / "figs" / "full_vs_blockdiag_ggn.png").stat().st_size > 0


def test_spectrum_cli_errors(tmp_path, capsys):
    ckpt = _ckpt(tmp_path, capsys)
    assert_clean_error(capsys, "spectrum", ckpt, "--block", "nope", "-o", tmp_path / "a.h5",
                       match="unknown block 'nope'")
    assert_clean_error(capsys, "spectrum", ckpt, "--block", "head", "--k", 5000,
                       "-o", tmp_path / "b.h5", match="cannot compute")
    assert not (tmp_path / "b.h5").exists()
    (tmp_path / "taken.h5").write_bytes(b"x")
    assert_clean_error(capsys, "spectrum", ckpt, "-o", tmp_path / "taken.h5",
                       match="exists; pass --overwrite or choose another output file")
    obj = torch.load(ckpt, weights_only=True)
    obj["state_dict"]["norm.weight"][0] = float("nan")
    torch.save(obj, tmp_path / "nan.pt")
    assert_clean_error(capsys, "spectrum", tmp_path / "nan.pt", "-o", tmp_path / "c.h5",
                       match="NaN or Inf")


def test_spectrum_cli_refuses_nonsense_numbers_without_output(tmp_path, capsys):
    ckpt = _ckpt(tmp_path, capsys)
    out = tmp_path / "n.h5"
    for args, match in [
        (("--k", -1), "--k must be >= 0"),
        (("--k", 0), "computes nothing"),
        (("--k", 2, "--density", "--steps", 0), "--steps must be >= 1"),
        (("--k", 2, "--density", "--probes", 0), "--probes must be >= 1"),
        (("--k", 3, "--basis-size", 3), "--basis-size must be at least k'+1 = 4"),
        (("--k", 3, "--max-iter", 2), "--max-iter 2 is smaller"),
        (("--k", 2, "--batch-size", 0), "--batch-size must be >= 1"),
        (("--k", 2, "--max-memory", "lots"), "not a size"),
    ]:
        assert_clean_error(capsys, "spectrum", ckpt, *args, "-o", out, match=match)
        assert not out.exists()


def test_spectrum_cli_memory_plan_refuses_in_one_line(tmp_path, capsys):
    ckpt = _ckpt(tmp_path, capsys)
    out = tmp_path / "m.h5"
    err = assert_clean_error(capsys, "spectrum", ckpt, "--k", 3, "--max-memory", "1M",
                             "-o", out, match="memory plan: estimated peak cpu")
    assert "over 1.0 MiB" in err and "--max-memory" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_spectrum_cli_restarted_disk_basis_progress_lines(tmp_path, capsys):
    ckpt = _ckpt(tmp_path, capsys)
    out = tmp_path / "r.h5"
    code, stdout, stderr = run_cli(capsys, "spectrum", ckpt, "--block", "layer.0", "--k", 3,
                                   "--basis-size", 6,
                                   "--basis-device", "disk", "--tol", "1e-8", "--dtype",
                                   "float64", "--cache", "off", "-o", out)
    assert code == 0, stderr
    assert "memory plan: cpu ~" in stderr and "recomputed products" in stderr
    # stderr is not a terminal: plain lines with Ritz values, residuals, restarts and an ETA
    lines = [ln for ln in stderr.splitlines() if ln.startswith("lanczos layer.0:")]
    assert len(lines) >= 3 and "ETA ≤" in lines[1] and "3/3 converged" in lines[-1]
    assert "done in" in lines[-1]
    assert "restarts" in lines[-1] and "max rel. residual" in lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "r.h5"]  # no scratch file
    with h5py.File(out, "r") as f:
        ev = read_spectra(f)["ggn"]["layer.0"]["eigenvalues"]
    model, _ = curvlab.load_checkpoint(ckpt, dtype=torch.float64)
    batch = curvlab.data.analysis_batches(curvlab.DataSpec(seq_len=8, batch_size=2), 1)
    block = curvlab.ggn(model, batch).block("layer.0").to_dense()
    dense = torch.linalg.eigvalsh(block).flip(0)[:3].numpy()
    assert np.allclose(ev, dense, rtol=1e-8)
    code, _, stderr = run_cli(capsys, "spectrum", ckpt, "--block", "layer.0", "--k", 2,
                              "--no-progress",
                              "-o", tmp_path / "q.h5")
    assert code == 0 and "lanczos full:" not in stderr
