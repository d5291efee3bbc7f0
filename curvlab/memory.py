"""Memory plans: the peak memory of a spectrum run, estimated before the first product.

A run of :func:`curvlab.spectra.compute_spectra` holds, at its peak,

    resident      what the process holds already (parameters, data, libraries): measured
    linearization the cached linearization of every batch (when products are cached):
                  ``8 F × batches`` with ``F`` the bytes one forward pass saves for backward
                  (``torch.func.linearize``'s traced graph keeps its constants, the VJP its own)
    product       one product's transient activations: ``F`` (cached: the tangents through the
                  stored graph) or ``3.5 F`` (recomputed: primal and tangent forward, then a VJP)
    vectors       parameter-sized vectors: Lanczos ``m`` basis vectors (on the basis device) plus
                  4 working ones (``q``, ``q_prev``, ``w``, the product's per-parameter
                  gradient); SLQ ``block × steps`` basis vectors (full reorthogonalization)
                  plus ``4 × block``; Hutch++ ``r = matvecs // 3`` sketch vectors plus
                  ``2 × block`` probes and ``3`` for the product; ``k'`` Ritz vectors with
                  ``--vectors``

per place (the operator's device, the host, the disk of a disk basis). Lanczos, SLQ and Hutch++
run one after the other, so the peak is the largest of the three. ``F`` is measured with saved-
tensor hooks on one forward pass (:meth:`~curvlab.curvature.operators._Engine.estimate_cache_bytes`
gives ``2 F × batches``). The constants were measured on a GPT-2 124M model (F = 1.03 GiB at
4×128 tokens: linearization +8.0 GiB, a recomputed product +3.6 GiB) and are checked against
measured peak RSS in docs/benchmarks.md. A plan that does not fit names the first option
that would make it fit.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from curvlab.curvature.extract import format_bytes
from curvlab.curvature.operators import available_memory
from curvlab.errors import CurvlabError
from curvlab.linalg.lanczos import _SLAB_ELEMENTS

WORK_VECTORS = 4  # Lanczos working vectors besides the basis (q, q_prev, w, the gradient)
CACHE_FORWARDS = 8.0  # the cached linearization of one batch, in forward passes F (measured)
CACHED_PRODUCT = 1.0  # one cached product's transient activations, in F
FRESH_PRODUCT = 3.5  # one recomputed product's (primal and tangent forward, VJP; measured)


class MemoryPlanError(CurvlabError):
    """The run would not fit in memory (or on disk); the message names an option that fits."""


@dataclass(frozen=True)
class SpectrumSettings:
    """What a spectrum run will do (the options a plan can suggest changing)."""

    k: int = 20
    which: str = "top"
    basis_size: int | None = None  # None: the full basis (max_iter vectors)
    basis_device: str = "device"  # "device", "cpu" or "disk"
    max_iter: int | None = None
    vectors: bool = False
    density: bool = False
    probes: int = 10
    steps: int = 80
    probe_block: int | None = None  # None: all probes in one block product (SLQ), 32 (Hutch++)
    reorth: str = "full"
    trace: bool = False
    trace_matvecs: int = 102
    batch_size: int = 1
    batches: int = 1
    cached: bool = True

    @property
    def wanted(self) -> int:
        return 2 * self.k if self.which == "both" else self.k


@dataclass(frozen=True)
class Measured:
    """What the plan is computed from: ``n`` coordinates of ``itemsize`` bytes, ``forward``
    (``F``, bytes saved by one forward pass of one batch), ``resident`` bytes on the device
    (and on the host, if another), the place names and their limits."""

    n: int
    itemsize: int
    forward: int
    resident_device: int
    resident_host: int
    device: str  # "cpu" or "cuda:0"
    limit_device: int
    limit_host: int
    limit_disk: int
    limit_reason: str

    @property
    def vector(self) -> int:
        return self.n * self.itemsize


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak bytes per place for ``settings``; ``parts`` name the terms of the
    largest phase (``(name, bytes, place)``); ``fits`` compares with ``limits``."""

    settings: SpectrumSettings
    measured: Measured
    peak: dict[str, int]
    limits: dict[str, int]
    parts: tuple[tuple[str, int, str], ...] = field(default=())

    @property
    def fits(self) -> bool:
        return all(self.peak.get(p, 0) <= lim for p, lim in self.limits.items())

    def describe(self) -> str:
        """One line: the peak per place and its main terms."""
        places = ", ".join(f"{p} ~{format_bytes(b)} of {format_bytes(self.limits[p])}"
                           for p, b in self.peak.items() if b)
        terms = ", ".join(f"{name} {format_bytes(b)}" for name, b, _ in self.parts if b)
        s = self.settings
        mode = "cached" if s.cached else "recomputed"
        return f"memory plan: {places} ({terms}; {mode} products)"

    def over(self) -> str:
        """What exceeds its limit (``""`` if the plan fits)."""
        return "; ".join(f"{p} ~{format_bytes(self.peak[p])} over {format_bytes(lim)}"
                         for p, lim in self.limits.items() if self.peak.get(p, 0) > lim)


def _estimate(m: Measured, s: SpectrumSettings) -> tuple[dict[str, int], tuple]:
    """Peak per place and the terms of the largest phase."""
    dev, V = m.device, m.vector
    cache = int(CACHE_FORWARDS * m.forward * s.batches)
    base_dev = m.resident_device + (cache if s.cached else 0)
    product = int((CACHED_PRODUCT if s.cached else FRESH_PRODUCT) * m.forward)
    place = {"device": dev, "cpu": "cpu", "disk": "disk"}[s.basis_device]

    def phase(items: list[tuple[str, int, str]]) -> tuple[dict[str, int], list]:
        peak: dict[str, int] = {"cpu": m.resident_host, "disk": 0}
        peak[dev] = base_dev
        for _, b, p in items:
            peak[p] = peak.get(p, 0) + b
        return peak, items

    phases = []
    fixed = [("resident", m.resident_device, dev)]
    if s.cached:
        fixed.append(("linearization", cache, dev))
    if s.k > 0:
        steps = s.max_iter or max(100, 10 * s.wanted)
        size = min(s.basis_size or steps, steps, m.n)
        items = [("product", product, dev), (f"{WORK_VECTORS} vectors", WORK_VECTORS * V, dev),
                 (f"basis {size} x {format_bytes(V)}", size * V, place)]
        slab = min(_SLAB_ELEMENTS, size * m.n) * m.itemsize  # a sweep / a restart's rows
        items.append(("slab", slab, "cpu" if s.basis_device == "disk" else place))
        if s.vectors:
            items.append((f"{s.wanted} Ritz vectors", s.wanted * V,
                          "cpu" if s.basis_device == "disk" else place))
        phases.append(phase(items))
    if s.density:
        block = min(s.probe_block or s.probes, s.probes)
        steps = min(s.steps, m.n)
        items = [("product", product, dev),
                 (f"{WORK_VECTORS * block} vectors", WORK_VECTORS * block * V, dev)]
        if s.reorth != "none":
            items.append((f"SLQ basis {block * steps} x {format_bytes(V)}",
                          block * steps * V, place))
            if s.basis_device == "disk":
                items.append(("slab", min(_SLAB_ELEMENTS, block * steps * m.n) * m.itemsize,
                              "cpu"))
        phases.append(phase(items))
    if s.trace:
        block = s.probe_block or 32
        r = min(s.trace_matvecs // 3, m.n)
        items = [("product", product, dev), (f"Hutch++ {r} + {2 * block + 3} vectors",
                                             (r + 2 * block + 3) * V, dev)]
        phases.append(phase(items))
    if not phases:
        phases.append(phase([]))
    best = max(phases, key=lambda ph: ph[0][dev] + ph[0].get("cpu", 0))
    peak, items = best
    peak = {p: b for p, b in peak.items() if b or p == dev}
    return peak, tuple(fixed + items)


def plan(m: Measured, s: SpectrumSettings) -> MemoryPlan:
    """The plan of ``s`` on ``m``'s machine."""
    peak, parts = _estimate(m, s)
    limits = {m.device: m.limit_device, "disk": m.limit_disk}
    if m.device != "cpu":
        limits["cpu"] = m.limit_host
    peak.setdefault("disk", 0)
    return MemoryPlan(s, m, peak, limits, parts)


def choose(m: Measured, s: SpectrumSettings, cache: bool | str = "auto") -> MemoryPlan:
    """The plan to run: cached products when ``cache`` is ``True``, or ``"auto"`` and they
    fit; else recomputed. Raises :class:`MemoryPlanError` (one line naming the option that
    would make it fit) when neither fits."""
    cached = plan(m, dataclasses.replace(s, cached=True))
    fresh = plan(m, dataclasses.replace(s, cached=False))
    if cache is True or (cache == "auto" and cached.fits):
        chosen = cached
    else:
        chosen = fresh
    if chosen.fits:
        return chosen
    hint = _suggestion(m, fresh.settings)
    terms = ", ".join(f"{name} {format_bytes(b)}" for name, b, _ in chosen.parts if b)
    raise MemoryPlanError(f"memory plan: estimated peak {chosen.over()} ({m.limit_reason}; "
                          f"{terms}); {hint}")


def _suggestion(m: Measured, s: SpectrumSettings) -> str:
    """The first change of options (in the order: disk basis, smaller basis, fewer tokens per
    product, smaller probe blocks, fewer Hutch++ vectors) that makes ``s`` fit."""
    tries: list[tuple[str, SpectrumSettings]] = []
    if s.basis_device != "disk" and (s.k > 0 or (s.density and s.reorth != "none")):
        tries.append(("--basis-device disk", dataclasses.replace(s, basis_device="disk")))
    if s.k > 0:
        for size in (40, 30, 20, s.wanted + 10, 2 * s.wanted + 1, s.wanted + 2, s.wanted + 1):
            if size >= s.wanted + 1 and size < (s.basis_size or 10**9):
                tries.append((f"--basis-size {size}", dataclasses.replace(s, basis_size=size)))
        for size in (2 * s.wanted + 1, s.wanted + 1):
            tries.append((f"--basis-size {size} --basis-device disk",
                          dataclasses.replace(s, basis_size=size, basis_device="disk")))
    for split in (2, 4, 8, 16):
        if s.batch_size >= split and s.batch_size % split == 0:
            tries.append((f"--batch-size {s.batch_size // split} --batches {s.batches * split}"
                          " (the same tokens, fewer per product)",
                          dataclasses.replace(s, batch_size=s.batch_size // split,
                                              batches=s.batches * split)))
    if s.density or s.trace:
        tries.append(("--probe-block 1", dataclasses.replace(s, probe_block=1)))
        if s.density:
            tries.append(("--probe-block 1 --basis-device disk",
                          dataclasses.replace(s, probe_block=1, basis_device="disk")))
    if s.trace:
        for mv in (30, 12, 3):
            if mv < s.trace_matvecs:
                tries.append((f"--probe-block 1 --trace-matvecs {mv}",
                              dataclasses.replace(s, probe_block=1, trace_matvecs=mv)))
    scale = s.batch_size
    for name, t in tries:
        if "--batch-size" in name:  # activations scale with the tokens of one batch
            mm = dataclasses.replace(m, forward=m.forward * t.batch_size // scale)
        else:
            mm = m
        p = plan(mm, t)
        if p.fits:
            return f"{name} would fit (~{format_bytes(max(p.peak.values()))})"
    return "no option of --basis-size, --basis-device, --batch-size/--batches or " \
           "--probe-block makes it fit on this machine"


def measure(op, *, scratch_dir: str | os.PathLike | None = None, max_memory: int | None = None,
            forward: int | None = None) -> Measured:
    """Measure what :func:`plan` needs from the curvature operator ``op`` (one forward pass with
    saved-tensor hooks, unless ``forward`` is given) and this machine: the process's resident
    memory now, the free memory of the device (``MemAvailable`` for the host), the free disk
    space at ``scratch_dir``; ``max_memory`` caps the device's limit."""
    engine = op.engine
    if forward is None:
        nb = len(engine.batches)
        factor = 4 if engine.kind == "hessian" else 2
        forward = engine.estimate_cache_bytes() // (factor * nb)
        if engine.kind == "hessian":
            forward *= 2
    device = op.device
    host_now = resident_bytes()
    if device.type == "cuda":
        dev_now = int(torch.cuda.memory_allocated(device))
        dev_limit = dev_now + available_memory(device)
        where = str(device)
    else:
        dev_now, dev_limit, where = host_now, host_now + available_memory(device), "cpu"
    reason = f"{'the GPU' if where != 'cpu' else 'RAM'} available"
    if max_memory is not None and max_memory < dev_limit:
        dev_limit, reason = max_memory, f"--max-memory {format_bytes(max_memory)}"
    host_limit = host_now + available_memory(torch.device("cpu"))
    folder = Path(scratch_dir) if scratch_dir is not None else Path(os.getcwd())
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    disk = int(0.9 * shutil.disk_usage(folder).free)
    return Measured(op.shape[0], op.dtype.itemsize, int(forward), dev_now, host_now, where,
                    dev_limit, host_limit, disk, reason)


def resident_bytes() -> int:
    """Resident memory of this process now (``VmRSS``; 0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def parse_bytes(text: str) -> int:
    """``"8G"``, ``"500M"``, ``"1.5GiB"``, ``"123456"`` -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    mult = units.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in units else t
    try:
        value = float(num)
    except ValueError:
        raise CurvlabError(f"not a size: {text!r} (e.g. 8G, 500M)") from None
    if value <= 0:
        raise CurvlabError(f"size must be positive, got {text!r}")
    return int(value * mult)
