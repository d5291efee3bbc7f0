"""`curvlab spectrum RUN_DIR` / several checkpoints: the step-axis file, its order, resume,
errors and figures (curvlab.trajectory, curvlab.plot.figures_along)."""

import json
import os

import h5py
import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

import curvlab
from curvlab import trajectory
from curvlab.models import ModelConfig, build_model
from tests.cli_helpers import assert_clean_error, run_cli

# vocabulary 16 (token ids from an .npy file): ~250 parameters, a dense GGN in float64 is cheap
CFG = ModelConfig("llama", vocab_size=16, seq_len=8, d_model=4, n_layers=1, n_heads=1, d_ff=4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step float64 AdamW run with a checkpoint every step (final.pt repeats step 3)."""
    root = tmp_path_factory.mktemp("run")
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, 4000).astype(np.int64)
    np.save(root / "tokens.npy", tokens)
    spec = curvlab.DataSpec(source=str(root / "tokens.npy"), seq_len=8, batch_size=2)
    init = curvlab.save_checkpoint(root / "init.pt", build_model(CFG, seed=0).double(),
                                   data=spec.to_dict())
    cfg = curvlab.TrainConfig(optimizer="adamw", init=str(init), data=str(root / "tokens.npy"),
                              micro_batch_size=2, max_steps=3, eval_every=3, eval_batches=1,
                              checkpoint_every=1, lr=3e-2, out=str(root / "adamw"),
                              dtype="float64")
    curvlab.train.train(cfg)
    return root


def _dense_ggn(model, batches) -> torch.Tensor:
    """(1/N) Σ_tokens Jᵀ (diag p − p pᵀ) J in float64 from explicit logit Jacobians."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().double().reshape(-1) for _, p in model.named_parameters()])

    def logits(flat, inputs):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[i:i + s.numel()].reshape(s)
            i += s.numel()
        return functional_call(model, parts, (inputs,))

    G, tokens = torch.zeros(len(theta), len(theta), dtype=torch.float64), 0
    for b in batches:
        J = jacrev(logits)(theta, b.inputs)  # [B, T, V, n]
        p = torch.softmax(logits(theta, b.inputs), -1).reshape(-1, CFG.vocab_size)
        J = J.reshape(-1, CFG.vocab_size, len(theta))
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        G += torch.einsum("tvn,tvw,twm->nm", J, H, J)
        tokens += b.targets.numel()
    return G / tokens


def _all_items(path) -> dict:
    """Every dataset (values) and attribute of a file, by path; timestamps left out."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
            for k, v in obj.attrs.items():
                out[f"{name}@{k}"] = v
        f.visititems(visit)
        for k, v in f.attrs.items():
            if k != "created":
                out[f"@{k}"] = v
    return out


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "fc":
        return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    return a.shape == b.shape and bool(np.all(a == b))


def test_find_checkpoints_order_and_final_rule(tmp_path):
    model = build_model(CFG, seed=0)
    folder = tmp_path / "r"
    for step, name in ((9, "step_9.pt"), (10, "step_10.pt"), (2, "step_000002.pt"),
                       (10, "final.pt")):
        curvlab.save_checkpoint(folder / name, model, step=step,
                                optimizer={"name": "adamw", "hparams": {"lr": 1e-3}})
    found = trajectory.find_checkpoints(folder)
    assert [c.step for c in found] == [2, 9, 10]  # numeric order; final.pt repeats step 10
    assert [os.path.basename(c.path) for c in found] == ["step_000002.pt", "step_9.pt",
                                                         "step_10.pt"]
    assert found[0].optimizer["name"] == "adamw"
    curvlab.save_checkpoint(folder / "final.pt", model, step=11)  # a new step: kept, last
    assert [os.path.basename(c.path) for c in trajectory.find_checkpoints(folder)][-1] == \
        "final.pt"
    # explicit files: sorted by their stored step; two at one step are refused
    files = [folder / "step_10.pt", folder / "step_000002.pt"]
    assert [c.step for c in trajectory.find_checkpoints(files)] == [2, 10]
    curvlab.save_checkpoint(tmp_path / "other.pt", model, step=9)
    with pytest.raises(curvlab.CurvlabError, match="both at step 9"):
        trajectory.find_checkpoints([folder / "step_9.pt", tmp_path / "other.pt"])


def test_run_folder_step_axis_against_dense_ggn(run, tmp_path, capsys):
    out = tmp_path / "traj.h5"
    code, stdout, err = run_cli(capsys, "spectrum", run / "adamw", "--k", 3, "--dtype",
                                "float64", "--tol", "1e-12", "--no-progress", "-o", out)
    assert code == 0, err
    for i in (1, 2, 3):
        assert f"checkpoint {i} of 3: {run / 'adamw' / f'step_00000{i}.pt'} (step {i})" in err
    assert "wrote" in stdout and "3 checkpoints" in stdout
    with h5py.File(out, "r") as f:  # plain h5py
        assert list(f["steps"][()]) == [1, 2, 3]
        assert [s.decode() for s in f["checkpoints"][()]] == [
            str(run / "adamw" / f"step_00000{i}.pt") for i in (1, 2, 3)]
        assert f["complete"][()].all()
        assert json.loads(f["optimizers"][0])["name"] == "adamw"
        assert f.attrs["layout"] == "steps" and f.attrs["kind"] == "ggn"
        data = json.loads(f.attrs["data"])  # recorded once, for all steps
        assert data["batches"] == 1 and data["source"].endswith("tokens.npy")
        stored = {s: f[f"step/{s}/spectrum/ggn/full/eigenvalues"][()] for s in (1, 2, 3)}
        series = f["series/lambda_max/full"][()]
        assert all(f[f"step/{s}"].attrs["complete"] for s in (1, 2, 3))
        assert "eigenvectors" not in f["step/1/spectrum/ggn/full"]
        shas = [s.decode() for s in f["checkpoint_sha256"][()]]
    assert shas[0] == curvlab.store.sha256_file(run / "adamw" / "step_000001.pt")
    # every step against the dense float64 GGN on the same batches
    from curvlab.inputs import load_analysis_inputs

    for s in (1, 2, 3):
        model, _, _, batches = load_analysis_inputs(
            str(run / "adamw" / f"step_00000{s}.pt"), None, None, None, 1, None, None, "train",
            "float64")
        exact = torch.linalg.eigvalsh(_dense_ggn(model, batches)).flip(0)[:3].numpy()
        np.testing.assert_allclose(stored[s], exact, rtol=1e-9)
        assert series[s - 1] == stored[s][0]
    # step 1 equals the single-checkpoint command on that file (same batches and options)
    single = tmp_path / "single.h5"
    code, _, err = run_cli(capsys, "spectrum", run / "adamw" / "step_000001.pt", "--k", 3,
                           "--dtype", "float64", "--tol", "1e-12", "--no-progress", "-o",
                           single)
    assert code == 0, err
    with h5py.File(single, "r") as f:
        np.testing.assert_array_equal(f["spectrum/ggn/full/eigenvalues"][()], stored[1])


def test_resume_after_interruption_equals_uninterrupted(run, tmp_path, monkeypatch):
    opts = dict(k=1, dtype="float64", blocks="layer", block_names=["embed"], full=True,
                density=True, probes=2, steps=6, trace=True, trace_matvecs=6, cache="off",
                gradient_share=True)
    whole = tmp_path / "whole.h5"
    curvlab.spectra_along(run / "adamw", whole, **opts)
    part = tmp_path / "part.h5"
    real_append, real_write, snapshots, calls = trajectory._append, \
        trajectory._write_quantities, [], []

    def append(path, fill, create=None):
        real_append(path, fill, create)
        snapshots.append(path.read_bytes())

    def write(*args):  # runs inside the append: the second checkpoint's group is half written
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(*args)

    monkeypatch.setattr(trajectory, "_append", append)
    monkeypatch.setattr(trajectory, "_write_quantities", write)
    with pytest.raises(KeyboardInterrupt):
        curvlab.spectra_along(run / "adamw", part, **opts)
    monkeypatch.undo()
    assert len(snapshots) == 1 and part.read_bytes() == snapshots[0]  # the file before it
    t = curvlab.read_trajectory(part)  # a valid file that says what is done
    assert list(t.complete) == [True, False, False]
    assert np.isnan(t.series["lambda_max/full"][1:]).all()
    with h5py.File(part, "r") as f:
        assert list(f["step"]) == ["1"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temporary left
    logged = []
    curvlab.spectra_along(run / "adamw", part, resume=True, log=logged.append, **opts)
    assert any("checkpoint 1 of 3" in m and "already done" in m for m in logged)
    assert any(m.startswith("checkpoint 2 of 3") and "already" not in m for m in logged)
    a, b = _all_items(whole), _all_items(part)
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not _same(a[k], b[k])]
    assert differ == ["@checkpoint"] or differ == [], differ  # nothing but timestamps
    # another option: refused in one line, the file untouched
    with pytest.raises(curvlab.CurvlabError, match="cannot resume .*option k differs"):
        curvlab.spectra_along(run / "adamw", part, resume=True, **{**opts, "k": 3})
    assert _all_items(part).keys() == b.keys()


def test_errors_one_line_and_no_file(run, tmp_path, capsys):
    out = tmp_path / "x.h5"
    (tmp_path / "empty").mkdir()
    assert_clean_error(capsys, "spectrum", tmp_path / "empty", "-o", out,
                       match="no checkpoint in this folder")
    assert_clean_error(capsys, "spectrum", tmp_path / "nothing", run / "adamw" / "final.pt",
                       "-o", out, match="no such checkpoint file or run folder")
    other = curvlab.save_checkpoint(tmp_path / "other.pt", build_model(
        ModelConfig("llama", vocab_size=16, seq_len=8, d_model=8, n_layers=1, n_heads=1,
                    d_ff=4)), step=7)
    assert_clean_error(capsys, "spectrum", run / "adamw", other, "-o", out,
                       match="holds another model")
    assert_clean_error(capsys, "spectrum", run / "adamw" / "step_000001.pt",
                       tmp_path / "r.h5", "-o", out, match="is a results file")
    assert_clean_error(capsys, "spectrum", run / "adamw", "--gradient-share", "--k", 0,
                       "--trace", "-o", out, match="--gradient-share needs eigenvectors")
    assert_clean_error(capsys, "spectrum", run / "adamw", "--heterogeneity", "-o", out,
                       match="needs at least two block targets")
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    plain = tmp_path / "plain.h5"  # --resume of a file that has no step axis: refused, kept
    prov = curvlab.store.make_provenance(other, {}, {}, "float64", "cpu")
    curvlab.store.create_file(plain, prov, curvlab.partition(build_model(CFG), "layer")).close()
    before = plain.read_bytes()
    assert_clean_error(capsys, "spectrum", run / "adamw", "--k", 1, "--resume", "-o", plain,
                       match="not a step-axis results file")
    assert plain.read_bytes() == before


def test_plot_one_and_two_runs(run, tmp_path, capsys):
    # a second "run" of the same model: the AdamW checkpoints relabelled as Muon
    muon = tmp_path / "muon"
    for s in (1, 2):
        model, info = curvlab.load_model(run / "adamw" / f"step_00000{s}.pt")
        curvlab.save_checkpoint(muon / f"step_00000{s}.pt", model, step=s, data=info.data,
                                optimizer={"name": "muon", "hparams": {"lr": 0.02}})
    files = []
    for name, src in (("a", run / "adamw"), ("m", muon)):
        files.append(tmp_path / f"{name}.h5")
        code, _, err = run_cli(capsys, "spectrum", src, "--k", 1, "--dtype", "float64",
                               "--no-progress", "--block", "embed", "--block", "layer.0",
                               "--full", "--heterogeneity", "--probes", 2, "--steps", 6,
                               "--sharpness", "--tol", "1e-4", "--cache", "off", "-o",
                               files[-1])
        assert code == 0, err
    # AdamW (β₁ = 0.9): threshold 38/η, η the lr of the step's metrics row; the relabelled
    # checkpoints hold no training config: λ_max(H), no threshold
    metrics = (run / "adamw" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    lrs = [r["lr"] for r in rows if r["step"] in (1, 2, 3)]
    a, m = curvlab.read_trajectory(files[0]), curvlab.read_trajectory(files[1])
    np.testing.assert_allclose(a.series["lr"], lrs, rtol=1e-12)
    np.testing.assert_allclose(a.series["sharpness_threshold"], 38 / np.array(lrs), rtol=1e-12)
    assert list(a.series["sharpness_kind"]) == ["adam"] * 3 and (a.series["sharpness"] > 0).all()
    assert list(m.series["sharpness_kind"]) == ["none"] * 2
    assert np.isnan(m.series["sharpness_threshold"]).all()
    code, stdout, err = run_cli(capsys, "plot", files[0], "-o", tmp_path / "one")
    assert code == 0, err
    one = sorted(os.listdir(tmp_path / "one"))
    assert {"lambda_max_full.png", "heterogeneity.png", "sharpness.png"} <= set(one)
    assert all(os.path.getsize(tmp_path / "one" / p) > 1000 for p in one)
    code, stdout, err = run_cli(capsys, "plot", *files, "-o", tmp_path / "two")
    assert code == 0, err
    assert all(os.path.getsize(tmp_path / "two" / p) > 1000
               for p in os.listdir(tmp_path / "two"))
    figs = dict(curvlab.plot.figures_along([str(f) for f in files]))
    ax = figs["lambda_max_full"].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["adamw", "muon"]
    x, y = ax.get_lines()[1].get_data()
    assert list(x) == [1, 2] and np.all(np.isfinite(y))
    lines = figs["sharpness"].axes[0].get_lines()  # AdamW, its threshold (dashed), Muon
    assert [ln.get_linestyle() for ln in lines] == ["-", "--", "-"]
    np.testing.assert_allclose(lines[1].get_ydata(), 38 / np.array(lrs))
    het = figs["heterogeneity"].axes[0].get_lines()[0].get_ydata()
    assert np.all((het > 0) & (het <= 1))  # mean JS distance of the block densities
    # a step-axis file beside a plain one: refused in one line
    single = tmp_path / "s.h5"
    prov = curvlab.store.make_provenance(run / "adamw" / "final.pt", {}, {}, "float64", "cpu")
    curvlab.store.create_file(single, prov, curvlab.partition(model, "layer")).close()
    assert_clean_error(capsys, "plot", files[0], single, match="has no step axis")


def _dense_gradient(model, batches) -> torch.Tensor:
    """∇ of the mean token cross-entropy over all batches, named_parameters order, float64."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    total, tokens = 0.0, 0
    for b in batches:
        logits = functional_call(model, params, (b.inputs,))
        total = total + torch.nn.functional.cross_entropy(
            logits.reshape(-1, CFG.vocab_size), b.targets.reshape(-1), reduction="sum")
        tokens += b.targets.numel()
    grads = torch.autograd.grad(total / tokens, [params[n] for n in names])
    return torch.cat([g.reshape(-1) for g in grads])


def test_gradient_and_step_share_against_dense(run, tmp_path, capsys):
    out = tmp_path / "q.h5"
    code, stdout, err = run_cli(capsys, "spectrum", run / "adamw", "--k", 3, "--dtype",
                                "float64", "--tol", "1e-12", "--no-progress", "--block", "embed",
                                "--full", "--gradient-share", "-o", out,
                                "--plot", tmp_path / "q.png")
    assert code == 0, err
    assert (tmp_path / "q_plots" / "gradient_share_embed.png").stat().st_size > 1000
    from curvlab.inputs import load_analysis_inputs

    t = curvlab.read_trajectory(out)
    models = []
    for s in (1, 2, 3):
        model, _, _, batches = load_analysis_inputs(
            str(run / "adamw" / f"step_00000{s}.pt"), None, None, None, 1, None, None, "train",
            "float64")
        models.append((model, batches))
    thetas = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m, _ in models]
    names = [n for n, _ in models[0][0].named_parameters()]
    sizes = [p.numel() for p in models[0][0].parameters()]
    emb = torch.zeros(sum(sizes), dtype=torch.bool)  # the coordinates of block "embed"
    emb[: sizes[0]] = True
    assert names[0] == "embed_tokens.weight" and t.attrs["options"]["targets"] == ["full", "embed"]
    with h5py.File(out, "r") as f:
        for i, s in enumerate((1, 2, 3)):
            model, batches = models[i]
            G, g = _dense_ggn(model, batches), _dense_gradient(model, batches)
            step = thetas[i + 1] - thetas[i] if i < 2 else None
            for target, mask in (("full", slice(None)), ("embed", emb)):
                sub = G[mask][:, mask]
                V = torch.linalg.eigh(sub).eigenvectors.flip(1)[:, :3]
                want = [float((V[:, :j].T @ g[mask]).square().sum() / g[mask].square().sum())
                        for j in (1, 2, 3)]
                got = f[f"step/{s}/gradient/share/{target}"][()]
                np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
                stepped = f[f"step/{s}/gradient/step_share/{target}"][()]
                if step is None:
                    assert np.isnan(stepped).all()
                else:
                    d = step[mask]
                    want = [float((V[:, :j].T @ d).square().sum() / d.square().sum())
                            for j in (1, 2, 3)]
                    np.testing.assert_allclose(stepped, want, rtol=1e-8, atol=1e-12)
                assert t.series[f"gradient_share/{target}"][i] == got[-1]
            assert abs(f[f"step/{s}/gradient"].attrs["norm"] - float(g.norm())) < 1e-12
            assert "eigenvectors" not in f[f"step/{s}/spectrum/ggn/full"]  # no --vectors
    assert np.isnan(t.series["step_share/full"][-1])


def test_torchrun_two_processes_equal_one(run, tmp_path, capsys):
    from tests.dist_helpers import torchrun

    args = ["--k", "1", "--dtype", "float64", "--batches", "2", "--gradient-share",
            "--no-progress", "--cache", "off"]
    p = torchrun(["spectrum", str(run / "adamw"), *args, "-o", str(tmp_path / "two.h5")])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "(2 processes)" in p.stdout and p.stderr.count("checkpoint 1 of 3") == 1
    code, _, err = run_cli(capsys, "spectrum", run / "adamw", *args, "-o", tmp_path / "one.h5")
    assert code == 0, err
    two, one = (curvlab.read_trajectory(tmp_path / f) for f in ("two.h5", "one.h5"))
    assert two.attrs["data"] == one.attrs["data"]  # provenance: the whole batches
    assert sorted(two.series) == sorted(one.series)
    for key in one.series:
        np.testing.assert_allclose(two.series[key], one.series[key], rtol=1e-9, atol=1e-12)


def test_kill_9_leaves_a_valid_file_that_resumes(run, tmp_path, capsys):
    import subprocess
    import sys
    import time

    from tests.dist_helpers import REPO

    out = tmp_path / "killed.h5"
    args = ["spectrum", str(run / "adamw"), "--k", "2", "--dtype", "float64", "--batches", "3",
            "--no-progress", "--cache", "off", "--trace", "--trace-matvecs", "30"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "curvlab", *args, "-o", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.kill()  # SIGKILL right after the first checkpoint is in
    finally:
        proc.wait()
    done = curvlab.read_trajectory(out).complete  # opens: a valid file
    assert done[0]
    code, _, err = run_cli(capsys, *args, "--resume", "-o", out)
    assert code == 0, err
    assert err.count("already done") == int(done.sum())
    code, _, err = run_cli(capsys, *args, "-o", tmp_path / "whole.h5")
    assert code == 0, err
    a, b = _all_items(out), _all_items(tmp_path / "whole.h5")
    assert sorted(a) == sorted(b)
    assert [k for k in a if not _same(a[k], b[k])] == []
