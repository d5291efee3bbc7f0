"""Curvature along a training run: every checkpoint of a run analyzed on the same batches into
one HDF5 file with a step axis (layout: docs/hdf5.md "Step-axis files").

- :func:`find_checkpoints`: a ``curvlab train --out`` folder (its ``step_*.pt`` in step order,
  ``final.pt`` only when its step is not among them) and/or checkpoint files, sorted by the
  training step stored in each; all must hold the same model (family, config, parameter names
  and shapes).
- :func:`spectra_along`: for each checkpoint the spectra ``curvlab spectrum`` computes
  (:func:`curvlab.spectra.compute_spectra`, same targets and options), and on request the
  gradient's share of the top-k eigenspace, the share of the step ``θ_{t+1} − θ_t`` to the next
  checkpoint, the (preconditioned) sharpness beside the optimizer's stability threshold, and the
  per-block heterogeneity (top eigenvalue, trace, SLQ density, pairwise Jensen-Shannon distances
  between the block densities); the formulas are in :mod:`curvlab.sharpness`. The analysis
  batches are built once from the first checkpoint's data (or the given data options) and used
  for every checkpoint; they are recorded once, in the root provenance.
- :func:`read_trajectory`: the step axis and the flat per-step series of such a file.

Each checkpoint is appended to the file atomically (a copy of the file with the new step, then
a rename; the file appears with the first finished checkpoint), so the file on disk is always
a valid HDF5 file that holds only complete steps
(``/complete`` and each ``/step/<s>`` group's ``complete`` attribute say which); ``resume=True``
reopens it, checks that it was made from the same checkpoints, batches and options, and skips
the finished steps. The result equals an uninterrupted run's (tested).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from curvlab.errors import ConfigError
from curvlab.fileutil import temp_beside

LAYOUT = "steps"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


@dataclass(frozen=True)
class RunCheckpoint:
    """One checkpoint of the step axis: its path, training step and optimizer record."""

    path: str
    step: int
    optimizer: dict[str, Any] = field(default_factory=dict)


# -- discovery ------------------------------------------------------------------------------

def _is_run_folder(p: Path) -> bool:
    return p.is_dir() and not (p / "config.json").exists()


def _signature(model, info) -> dict[str, Any]:
    return {"model": json.loads(json.dumps(info.model_dict(), sort_keys=True)),
            "params": {n: list(t.shape) for n, t in model.named_parameters()}}


def _model_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    ma, mb = a["model"], b["model"]
    for key in sorted(set(ma) | set(mb)):
        if ma.get(key) != mb.get(key):
            return f"model {key} {ma.get(key)!r} vs {mb.get(key)!r}"
    pa, pb = a["params"], b["params"]
    if list(pa) != list(pb):
        extra = sorted(set(pa) ^ set(pb))
        return f"parameter names differ ({', '.join(extra[:3]) or 'order'})"
    for name in pa:
        if pa[name] != pb[name]:
            return f"parameter {name} has shape {tuple(pa[name])} vs {tuple(pb[name])}"
    return ""


def find_checkpoints(sources: str | os.PathLike | Sequence[str | os.PathLike]
                     ) -> list[RunCheckpoint]:
    """The checkpoints of ``sources``, ascending by training step.

    Each source is a ``curvlab train --out`` folder (its ``step_*.pt`` and ``final.pt``;
    ``final.pt`` is left out when its stored step equals one of the ``step_*.pt``), a
    checkpoint file, or a Hugging Face model folder (one with ``config.json``). Every
    checkpoint is loaded once (on the CPU) to read its step and check that all hold the same
    model. One-line :class:`~curvlab.errors.CurvlabError` for: a path that does not exist or is
    neither, a run folder without checkpoints, an ``.h5`` results file among them, checkpoints
    of different models, two checkpoints at the same step.
    """
    from curvlab.checkpoint import load_model

    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise ConfigError("no checkpoints given")
    files: list[tuple[Path, bool]] = []  # (path, is the final.pt of a run folder)
    for src in sources:
        p = Path(src)
        if str(p).endswith((".h5", ".hdf5")):
            raise ConfigError(f"{p} is a results file: an .h5 SOURCE is analyzed alone (its "
                              "stored blocks), not with checkpoints")
        if not p.exists():
            raise ConfigError(f"{p}: no such checkpoint file or run folder")
        if _is_run_folder(p):
            steps = sorted((int(m.group(1)), q) for q in p.iterdir()
                           if (m := _STEP_FILE.match(q.name)) and q.is_file())
            found = [(q, False) for _, q in steps]
            if (p / "final.pt").is_file():
                found.append((p / "final.pt", True))
            if not found:
                raise ConfigError(f"{p}: no checkpoint in this folder (a curvlab train --out "
                                  "folder holds step_NNNNNN.pt and final.pt)")
            files += found
        elif p.is_file() or p.is_dir():
            files.append((p, False))
        else:
            raise ConfigError(f"{p}: neither a checkpoint file nor a run folder")
    out: list[RunCheckpoint] = []
    finals: list[RunCheckpoint] = []
    first_sig: dict[str, Any] | None = None
    for path, is_final in files:
        model, info = load_model(path)
        sig = _signature(model, info)
        del model
        if first_sig is None:
            first_sig, first_path = sig, path
        elif (why := _model_difference(first_sig, sig)):
            raise ConfigError(f"{path} holds another model than {first_path} ({why}); "
                              "analyze checkpoints of one model per call")
        ck = RunCheckpoint(str(path), int(info.step), dict(info.optimizer or {}))
        (finals if is_final else out).append(ck)
    seen = {c.step for c in out}
    out += [c for c in finals if c.step not in seen]
    out.sort(key=lambda c: c.step)
    for a, b in zip(out, out[1:]):
        if a.step == b.step:
            raise ConfigError(f"{a.path} and {b.path} are both at step {a.step}; the step axis "
                              "needs one checkpoint per step")
    return out


# -- file layout ----------------------------------------------------------------------------

def _targets(blocks, block_names: Sequence[str], full: bool | None, blockdiag: bool,
             all_blocks: bool) -> list[str]:
    """Targets as ``curvlab spectrum`` chooses them (see docs/cli.md)."""
    targets = list(block_names)
    if not targets and all_blocks:
        targets = list(blocks.names)
    if full if full is not None else not block_names:
        targets.insert(0, "full")
    if blockdiag:
        targets.append("blockdiag")
    for t in targets:
        if t not in ("full", "blockdiag"):
            blocks[t]  # unknown names fail here, listing the valid ones
    return targets


def _str_array(values: Sequence[str]) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


def _skeleton(f: h5py.File, checkpoints: Sequence[RunCheckpoint], shas: Sequence[str],
              kind: str, targets: Sequence[str], options: Mapping[str, Any],
              block_targets: Sequence[str]) -> None:
    from curvlab.store.schema import STR, encode_name

    n = len(checkpoints)
    f.attrs["layout"] = LAYOUT
    f.attrs["kind"] = kind
    f.attrs["options"] = json.dumps(dict(options), sort_keys=True)
    f.create_dataset("steps", data=np.array([c.step for c in checkpoints], dtype=np.int64))
    f.create_dataset("checkpoints", data=_str_array([c.path for c in checkpoints]), dtype=STR)
    f.create_dataset("checkpoint_sha256", data=_str_array(shas), dtype=STR)
    f.create_dataset("optimizers", dtype=STR, data=_str_array(
        [json.dumps(c.optimizer, sort_keys=True, default=str) for c in checkpoints]))
    f.create_dataset("complete", data=np.zeros(n, dtype=bool))
    f.create_group("step")
    s = f.create_group("series")
    s.attrs["kind"] = kind
    nan = np.full(n, np.nan)
    lanczos_targets = list(targets) if options["k"] > 0 else []
    for name in ("lambda_max",) + (("gradient_share", "step_share")
                                    if options["gradient_share"] else ()):
        g = s.create_group(name)
        for t in lanczos_targets:
            g.create_dataset(encode_name(t), data=nan)
    if options["sharpness"]:
        for name in ("sharpness", "sharpness_threshold", "lr"):
            s.create_dataset(name, data=nan)
        s.create_dataset("sharpness_kind", data=_str_array([""] * n), dtype=STR)
    if options["heterogeneity"]:
        b = len(block_targets)
        for name, shape in (("block_lambda_max", (n, b)), ("block_trace", (n, b)),
                            ("js_distance", (n, b, b))):
            ds = s.create_dataset(name, data=np.full(shape, np.nan))
            ds.attrs.create("names", _str_array(block_targets), dtype=STR)


def _append(path: Path, fill: Callable[[h5py.File], None],
            create: Callable[[str], None] | None = None) -> None:
    """Apply ``fill`` to a copy of ``path`` (or to a new file made by ``create(tmp)``) and
    rename the copy over it (atomic: a killed run leaves the previous, valid file, or none)."""
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        if create is not None:
            create(tmp)
        else:
            shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            fill(f)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Trajectory:
    """A step-axis file read back: ``steps`` [n], ``checkpoints``, ``optimizers`` (dicts),
    ``complete`` [n] bool, ``series`` (name -> array, per-target series as
    ``"lambda_max/full"`` etc.), ``attrs`` (root attributes, ``model``/``data``/``options``
    decoded), ``block_names`` of the heterogeneity series."""

    path: str
    steps: np.ndarray
    checkpoints: list[str]
    optimizers: list[dict[str, Any]]
    complete: np.ndarray
    series: dict[str, np.ndarray]
    attrs: dict[str, Any]
    block_names: list[str]

    @property
    def kind(self) -> str:
        return str(self.attrs.get("kind", ""))

    @property
    def optimizer(self) -> str:
        """The run's optimizer: the name stored in the last checkpoint."""
        return str(self.optimizers[-1].get("name", "?")) if self.optimizers else "?"


def is_trajectory(path: str | os.PathLike) -> bool:
    """True if ``path`` is a step-axis results file."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return f.attrs.get("layout") == LAYOUT
    except OSError:
        return False


def read_trajectory(path: str | os.PathLike) -> Trajectory:
    """Read the step axis and the flat series of a step-axis file (see docs/hdf5.md)."""
    from curvlab.store.schema import StoreError, decode_name, open_h5

    with open_h5(path, "r", "read", locking=False) as f:
        if f.attrs.get("layout") != LAYOUT:
            raise StoreError(f"{path} is not a step-axis results file (curvlab spectrum on "
                             "a run folder or several checkpoints writes one)")
        series: dict[str, np.ndarray] = {}
        names: list[str] = []

        def visit(name: str, obj: Any) -> None:
            nonlocal names
            if isinstance(obj, h5py.Dataset):
                parts = name.split("/")
                key = "/".join(parts[:-1] + [decode_name(parts[-1])])
                value = obj[()]
                if obj.dtype.kind == "O":
                    value = np.array([v.decode() if isinstance(v, bytes) else str(v)
                                      for v in value], dtype=object)
                series[key] = value
                if "names" in obj.attrs:
                    names = [str(v) for v in obj.attrs["names"]]

        f["series"].visititems(visit)
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        for key in ("model", "data", "options"):
            if isinstance(attrs.get(key), str):
                attrs[key] = json.loads(attrs[key])

        def strings(name: str) -> list[str]:
            return [v.decode() if isinstance(v, bytes) else str(v) for v in f[name][()]]

        return Trajectory(str(path), f["steps"][()], strings("checkpoints"),
                          [json.loads(s) for s in strings("optimizers")], f["complete"][()],
                          series, attrs, names)


# -- the analysis ---------------------------------------------------------------------------

def _lanczos_without_vectors(spectrum):
    """``spectrum`` with its Ritz vectors dropped (computed for the shares, not stored)."""
    if spectrum.lanczos is None or spectrum.lanczos.eigenvectors is None:
        return spectrum
    return replace(spectrum, lanczos=replace(spectrum.lanczos, eigenvectors=None))


def _coords(blocks, target: str) -> slice:
    """The coordinates of a target in the full (partition-order) vector."""
    if target in ("full", "blockdiag"):
        return slice(None)
    i = blocks.names.index(target)
    start = blocks.offsets[i]
    return slice(start, start + blocks.sizes[i])


def _cumulative_share(vectors: torch.Tensor, v: torch.Tensor) -> np.ndarray:
    """``‖V_iᵀ v‖² / ‖v‖²`` for ``i = 1..k`` (the first ``i`` Ritz vectors)."""
    from curvlab import sharpness as sh

    k = vectors.shape[1]
    return np.array([sh.gradient_share(vectors[:, : i + 1], v) for i in range(k)],
                    dtype=np.float64)


def _options(**kw: Any) -> dict[str, Any]:
    return json.loads(json.dumps(kw, sort_keys=True))


def spectra_along(
    checkpoints: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    kind: str = "ggn",
    blocks: str | Sequence[str] | None = None,
    block_names: Sequence[str] = (),
    full: bool | None = None,
    blockdiag: bool = False,
    k: int = 20,
    which: str = "top",
    tol: float = 1e-6,
    reorth: str = "full",
    max_iter: int | None = None,
    basis_size: int | None = None,
    basis_device: str = "device",
    cache: str = "auto",
    max_memory: int | None = None,
    density: bool = False,
    probes: int = 10,
    steps: int = 80,
    probe_block: int | None = None,
    trace: bool = False,
    trace_matvecs: int = 102,
    vectors: bool = False,
    seed: int = 0,
    gradient_share: bool = False,
    sharpness: bool = False,
    heterogeneity: bool = False,
    data: Mapping[str, Any] | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    precision: str = "fp32",
    compile: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    progress: Callable[[str, Any], None] | None = None,
) -> Trajectory:
    """Analyze every checkpoint of a run on the same batches into one step-axis file ``out``.

    ``checkpoints``: a run folder, checkpoint files, or a mix (see :func:`find_checkpoints`).
    The spectrum options (``kind`` ... ``seed``) are those of :func:`curvlab.spectra.
    compute_spectra` and ``curvlab spectrum`` and apply to every checkpoint; ``blocks`` is the
    partition (a preset or block specs; alone, without ``block_names``, every block is a
    target). ``data``: the data options of the analysis commands (``source``, ``batch_size``,
    ``seq_len``, ``batches``, ``seed``, ``windows``, ``split``, ``tokenizer``, ``text_field``);
    they are resolved once against the first checkpoint's stored data and the resulting batches
    are used for all checkpoints.

    Per checkpoint, on request (mean token cross-entropy on the analysis batches, partition
    order of the coordinates; formulas in :mod:`curvlab.sharpness`):

    - ``gradient_share``: ``‖V_iᵀ g‖² / ‖g‖²`` for the first ``i = 1..k`` Ritz vectors of each
      Lanczos target (``g`` restricted to a block's coordinates for a block target), and the
      same for ``Δθ = θ_{t+1} − θ_t`` towards the next checkpoint (NaN at the last one). The
      Ritz vectors are computed for this and stored only with ``vectors``.
    - ``sharpness``: with the AdamW state in the checkpoint, ``λ_max(P⁻¹H)`` for
      ``P = diag(√v̂ + ε)`` as the optimizer applied it, beside the threshold
      ``(2 + 2β₁)/((1 − β₁)η)`` (Cohen et al. 2022); for the others ``λ_max(H)`` beside ``2/η``
      where :func:`curvlab.sharpness.stability_threshold` defines one (NaN otherwise). ``H``
      is the Hessian on the same batches, whatever ``kind``.
    - ``heterogeneity`` (implies ``density``; needs at least two block targets): per block
      target its top eigenvalue (NaN with ``k = 0``), trace (Hutch++ with ``trace``, else the
      SLQ estimate) and the pairwise Jensen-Shannon distances of the block densities on a
      common grid.

    ``log`` receives one line per checkpoint (``checkpoint i of n: <path> (step s)``), the
    memory plan and skipped steps; ``progress(target, report)`` the Lanczos/SLQ/Hutch++
    progress. ``resume``: continue ``out`` if it exists (it must come from the same
    checkpoints, model, batches, dtype, precision, blocks and options). Returns the file read
    back (:func:`read_trajectory`). Under ``torchrun`` every rank computes and rank 0 writes.
    """
    from curvlab import distributed, memory, store
    from curvlab.checkpoint import load_model
    from curvlab.curvature.blocks import partition as make_partition
    from curvlab.curvature.operators import curvature_operator, default_partition
    from curvlab.inputs import _param_checksum, data_provenance, load_analysis_inputs
    from curvlab.linalg import default_basis_size, lanczos
    from curvlab.spectra import (
        check_spectrum_numbers,
        check_target_size,
        compute_spectra,
        target_operator,
    )
    from curvlab.store.schema import encode_name
    from curvlab.store.spectrum import write_target_spectrum

    say = log or (lambda msg: None)
    check_spectrum_numbers(k=k, which=which, tol=tol, max_iter=max_iter, basis_size=basis_size,
                           density=density or heterogeneity, probes=probes, steps=steps,
                           probe_block=probe_block, trace=trace, trace_matvecs=trace_matvecs)
    if gradient_share and k == 0:
        raise ConfigError("--gradient-share needs eigenvectors: use --k >= 1")
    if heterogeneity:
        density = True
    if k > 0 and basis_size is None:
        basis_size = default_basis_size(k, which)
    main = distributed.is_main()
    device = distributed.local_device(device)
    out = Path(out)
    resuming = distributed.broadcast_object(bool(resume and out.exists()))
    if main and not resuming:
        store.check_output(out, overwrite, remedy="pass --overwrite, resume it (--resume)")
    cks = find_checkpoints(checkpoints)
    d = dict(data or {})
    split = d.get("split", "train")
    model, info, spec, batches = load_analysis_inputs(
        cks[0].path, d.get("source"), d.get("batch_size"), d.get("seq_len"),
        d.get("batches", 1), d.get("seed"), d.get("windows"), split, dtype, device,
        tokenizer=d.get("tokenizer"), text_field=d.get("text_field"))
    if blocks:
        part = make_partition(model, blocks if isinstance(blocks, str) else list(blocks))
    else:
        part = default_partition(model)
    targets = _targets(part, block_names, full, blockdiag, all_blocks=bool(blocks))
    block_targets = [t for t in targets if t not in ("full", "blockdiag")]
    if heterogeneity and len(block_targets) < 2:
        raise ConfigError("--heterogeneity compares block densities: it needs at least two "
                          "block targets (--blocks PRESET alone, or several --block)")
    options = _options(
        kind=kind, blocks=blocks if blocks is None or isinstance(blocks, str) else list(blocks),
        targets=targets, k=k, which=which, tol=tol, reorth=reorth, max_iter=max_iter,
        basis_size=basis_size, density=density, probes=probes, steps=steps,
        probe_block=probe_block, trace=trace, trace_matvecs=trace_matvecs, vectors=vectors,
        seed=seed, gradient_share=gradient_share, sharpness=sharpness,
        heterogeneity=heterogeneity)
    prov = store.make_provenance(cks[0].path, info.model_dict(),
                                 data_provenance(spec, batches, split), dtype, device,
                                 precision=precision)
    shas = [store.sha256_file(c.path) for c in cks] if main else []
    n = len(cks)
    done = np.zeros(n, dtype=bool)
    if main and resuming:
        done = _check_resume(out, prov, part, options, cks, shas)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}

    def create(tmp: str) -> None:  # the file appears with its first checkpoint
        with store.create_file(tmp, prov, part, param_shapes=shapes, overwrite=True) as w:
            _skeleton(w.file, cks, shas, kind, targets, options, block_targets)

    exists = resuming
    done = distributed.broadcast_object(done.tolist() if main else None)
    for note in info.notes:  # after every check that can refuse the run
        say(f"note: {note}")
    scratch = out.parent.absolute()
    plan = None
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]

    def load(i: int):
        m, inf = load_model(cks[i].path, device=device, dtype=torch_dtype)
        if distributed.active():
            distributed.check_same("model", {"checkpoint": cks[i].path,
                                             "checksum": _param_checksum(m)})
        return m, inf

    for i, ck in enumerate(cks):
        if done[i]:
            say(f"checkpoint {i + 1} of {n}: {ck.path} (step {ck.step}) already done")
            continue
        say(f"checkpoint {i + 1} of {n}: {ck.path} (step {ck.step})")
        if i > 0:
            model, info = load(i)
        op = curvature_operator(kind, model, batches, part, precision=precision,
                                compile=compile)
        for t in targets:
            check_target_size(target_operator(op, t), t, k, which)
        if plan is None:
            settings = memory.SpectrumSettings(
                k=k, which=which, basis_size=basis_size, basis_device=basis_device,
                max_iter=max_iter, vectors=vectors or gradient_share, density=density,
                probes=probes, steps=steps, probe_block=probe_block, reorth=reorth,
                trace=trace, trace_matvecs=trace_matvecs, batch_size=spec.batch_size,
                batches=len(batches))
            plan = memory.choose(memory.measure(op, scratch_dir=scratch, max_memory=max_memory),
                                 settings, cache={"auto": "auto", "on": True, "off": False}[cache])
            say(plan.describe())
        op.engine.set_cache(plan.settings.cached)
        results = []
        for t in targets:
            results += compute_spectra(
                op, [t], k=k, which=which, tol=tol, reorth=reorth, max_iter=max_iter,
                basis_size=basis_size,
                basis_device=None if basis_device == "device" else basis_device,
                scratch_dir=scratch, density=density, probes=probes, steps=steps,
                probe_block=probe_block, trace=trace, trace_matvecs=trace_matvecs,
                return_vectors=vectors or gradient_share, seed=seed, progress=progress)
        extra = _quantities(i, cks, model, info, op, part, batches, results, load=load,
                            gradient_share=gradient_share, sharpness=sharpness,
                            heterogeneity=heterogeneity, kind=kind, precision=precision,
                            tol=tol, seed=seed, lanczos=lanczos, cached=plan.settings.cached,
                            progress=progress)
        if not vectors:
            results = [_lanczos_without_vectors(r) for r in results]
        if main:
            sha = shas[i]

            def fill(f: h5py.File, i=i, ck=ck, results=results, extra=extra, sha=sha) -> None:
                g = f["step"].create_group(str(ck.step))
                g.attrs["step"], g.attrs["index"] = np.int64(ck.step), np.int64(i)
                g.attrs["checkpoint"], g.attrs["checkpoint_sha256"] = ck.path, sha
                g.attrs["optimizer"] = json.dumps(ck.optimizer, sort_keys=True, default=str)
                g.attrs["complete"] = False
                for r in results:
                    write_target_spectrum(g, kind, r)
                s = f["series"]
                if k > 0:
                    for r in results:
                        if r.lanczos is not None and len(r.lanczos.eigenvalues):
                            s["lambda_max"][encode_name(r.target)][i] = float(
                                r.lanczos.eigenvalues[0])
                _write_quantities(g, s, i, extra)
                g.attrs["complete"] = True
                f["complete"][i] = True

            _append(out, fill, None if exists else create)
            exists = True
        del op
    return read_trajectory(out) if main else None  # type: ignore[return-value]


def _check_resume(out: Path, prov, part, options: Mapping[str, Any],
                  cks: Sequence[RunCheckpoint], shas: Sequence[str]) -> np.ndarray:
    from curvlab.store.schema import (
        FORMAT,
        Provenance,
        StoreError,
        open_h5,
        partition_differences,
        read_partition,
    )

    with open_h5(out, "r", "resume", locking=False) as f:
        if f.attrs.get("format") != FORMAT or f.attrs.get("layout") != LAYOUT:
            raise StoreError(f"cannot resume {out}: not a step-axis results file")
        diffs = Provenance.from_attrs(f.attrs).differences(prov)
        diffs += partition_differences(read_partition(f["blocks"]), part)
        stored = json.loads(f.attrs["options"])
        for key in sorted(set(stored) | set(options)):
            if stored.get(key) != options.get(key):
                diffs.append(f"option {key} differs (file {stored.get(key)!r}, now "
                             f"{options.get(key)!r})")
        old = [v.decode() if isinstance(v, bytes) else str(v)
               for v in f["checkpoint_sha256"][()]]
        if old != list(shas):
            diffs.append(f"the checkpoints differ (file: {len(old)}, now: {len(shas)}; "
                         "same count and bytes needed)")
        if diffs:
            raise StoreError(f"cannot resume {out}: {'; '.join(diffs)}")
        return np.asarray(f["complete"][()], dtype=bool)


def _quantities(i, cks, model, info, op, part, batches, results, *, load, gradient_share,
                sharpness, heterogeneity, kind, precision, tol, seed, lanczos,
                cached, progress) -> dict[str, Any]:
    """The per-checkpoint quantities beyond the spectra (see :func:`spectra_along`)."""
    out: dict[str, Any] = {}
    if not (gradient_share or sharpness or heterogeneity):
        return out
    from curvlab import sharpness as sh
    from curvlab.curvature.operators import curvature_operator

    if gradient_share:
        g = sh.loss_gradient(op)
        theta = sh.parameter_vector(model, op)
        delta = None
        if i + 1 < len(cks):
            nxt, _ = load(i + 1)
            delta = sh.parameter_vector(nxt, op) - theta
            del nxt
        shares, steps_ = {}, {}
        for r in results:
            if r.lanczos is None or r.lanczos.eigenvectors is None:
                continue
            V = r.lanczos.eigenvectors.to(g.device, g.dtype)
            sl = _coords(part, r.target)
            shares[r.target] = _cumulative_share(V, g[sl])
            steps_[r.target] = (_cumulative_share(V, delta[sl]) if delta is not None
                                else np.full(V.shape[1], np.nan))
        out["gradient"] = dict(norm=float(g.norm()),
                               step_norm=float(delta.norm()) if delta is not None else np.nan,
                               share=shares, step_share=steps_)
    if sharpness:
        hess = op if kind == "hessian" else curvature_operator(
            "hessian", model, batches, part, precision=precision)
        if hess is not op:  # the main operator already ran products (and chose its cache)
            hess.engine.set_cache(cached)  # as the memory plan chose for the main operator
        lr = sh.checkpoint_lr(info)
        betas = ((info.extra or {}).get("train_config") or {}).get("betas")
        p = sh.adam_preconditioner(info, hess, model)
        tell = None if progress is None else (lambda report: progress("sharpness", report))
        if p is not None:
            res = sh.preconditioned_sharpness(hess, p, k=1, tol=tol, seed=seed, progress=tell)
        else:
            res = lanczos(hess, k=1, tol=tol, seed=seed, progress=tell)
        th = sh.checkpoint_threshold(info)
        out["sharpness"] = dict(
            kind=th[0] if th is not None else ("adam" if p is not None else "none"),
            value=float(res.eigenvalues[0]), eigenvalues=res.eigenvalues.double().cpu().numpy(),
            threshold=float(th[1]) if th is not None else np.nan,
            lr=float(lr) if lr is not None else np.nan,
            beta1=float(betas[0] if betas else 0.9) if p is not None else np.nan)
    if heterogeneity:
        blk = [r for r in results if r.target not in ("full", "blockdiag")]
        grid, js = sh.js_distances([r.density for r in blk])
        out["heterogeneity"] = dict(
            names=[r.target for r in blk],
            lambda_max=np.array([float(r.lanczos.eigenvalues[0]) if r.lanczos is not None
                                 and len(r.lanczos.eigenvalues) else np.nan for r in blk]),
            trace=np.array([float(r.trace.estimate) if r.trace is not None
                            else float(r.density.trace_estimate) for r in blk]),
            grid=np.asarray(grid.cpu() if hasattr(grid, "cpu") else grid, dtype=np.float64),
            js=np.asarray(js.cpu() if hasattr(js, "cpu") else js, dtype=np.float64))
    return out


def _write_quantities(g: h5py.Group, s: h5py.Group, i: int, extra: Mapping[str, Any]) -> None:
    from curvlab.store.schema import STR, encode_name

    if "gradient" in extra:
        e = extra["gradient"]
        gg = g.create_group("gradient")
        gg.attrs["norm"], gg.attrs["step_norm"] = e["norm"], e["step_norm"]
        for sub, key in (("share", "gradient_share"), ("step_share", "step_share")):
            h = gg.create_group(sub)
            for t, v in e[sub].items():
                h.create_dataset(encode_name(t), data=v)
                s[key][encode_name(t)][i] = v[-1]
    if "sharpness" in extra:
        e = extra["sharpness"]
        sg = g.create_group("sharpness")
        for key in ("kind", "value", "threshold", "lr", "beta1"):
            sg.attrs[key] = e[key]
        sg.create_dataset("eigenvalues", data=e["eigenvalues"])
        s["sharpness"][i] = e["value"]
        s["sharpness_threshold"][i] = e["threshold"]
        s["lr"][i] = e["lr"]
        s["sharpness_kind"][i] = e["kind"]
    if "heterogeneity" in extra:
        e = extra["heterogeneity"]
        hg = g.create_group("heterogeneity")
        hg.attrs.create("names", _str_array(e["names"]), dtype=STR)
        for key in ("lambda_max", "trace", "grid", "js"):
            hg.create_dataset(key, data=e[key])
        s["block_lambda_max"][i] = e["lambda_max"]
        s["block_trace"][i] = e["trace"]
        s["js_distance"][i] = e["js"]


def is_single_source(sources: Sequence[str]) -> bool:
    """True when ``curvlab spectrum SOURCE`` keeps its single-checkpoint behaviour: one source
    that is a results file, a checkpoint file or a Hugging Face folder (not a run folder)."""
    return len(sources) == 1 and not _is_run_folder(Path(sources[0]))
