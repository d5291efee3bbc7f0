"""The memory plan of spectrum runs (curvlab.memory) on made-up machines."""

import dataclasses

import pytest

from curvlab.memory import Measured, MemoryPlanError, SpectrumSettings, choose, parse_bytes, plan

GiB = 2**30


def machine(limit_gib: float, forward_gib: float = 1.0, n: int = 125_000_000) -> Measured:
    return Measured(n=n, itemsize=4, forward=int(forward_gib * GiB), resident_device=2 * GiB,
                    resident_host=2 * GiB, device="cpu", limit_device=int(limit_gib * GiB),
                    limit_host=int(limit_gib * GiB), limit_disk=100 * GiB,
                    limit_reason="RAM available")


S = SpectrumSettings(k=10, basis_size=21, batch_size=4, batches=1)


def test_plan_adds_its_terms():
    m = machine(100)
    p = plan(m, S)
    V = m.vector
    assert p.peak["cpu"] == 2 * GiB + 8 * GiB + 1 * GiB + (4 + 21) * V + min(1 << 24, 21 * m.n) * 4
    disk = plan(m, dataclasses.replace(S, basis_device="disk"))
    assert disk.peak["disk"] == 21 * V and disk.peak["cpu"] == p.peak["cpu"] - 21 * V
    assert "basis 21 x" in p.describe() and "cached products" in p.describe()


def test_choose_prefers_cached_then_recomputed_then_refuses():
    assert choose(machine(100), S).settings.cached
    fresh = choose(machine(18), S)  # cached needs ~23 GiB, recomputed ~16 GiB
    assert not fresh.settings.cached and fresh.fits
    with pytest.raises(MemoryPlanError) as e:
        choose(machine(8), S)
    msg = str(e.value)
    assert "\n" not in msg and "--basis-device disk would fit" in msg and "over" in msg
    # with the basis on disk already, the next advice is fewer tokens per product
    with pytest.raises(MemoryPlanError, match="--batch-size 2 --batches 2"):
        choose(machine(6.5), dataclasses.replace(S, basis_device="disk"))
    with pytest.raises(MemoryPlanError, match="no option"):
        choose(machine(1), S)


def test_trace_and_density_advice():
    s = SpectrumSettings(k=0, density=True, probes=10, steps=80, trace=True, basis_device="disk")
    with pytest.raises(MemoryPlanError, match="--probe-block 1"):
        choose(machine(40), s)


def test_parse_bytes():
    assert parse_bytes("8G") == 8 * GiB and parse_bytes("500MiB") == 500 * 2**20
    assert parse_bytes("1024") == 1024
    with pytest.raises(Exception, match="not a size"):
        parse_bytes("lots")
