"""What each Hugging Face family needs from curvlab, measured on the tiny configs of the test
matrix (``tests/hf_families.py``), saved with ``save_pretrained`` and loaded as users load them.

    python benchmarks/hf_families.py [--family llama ...]

Per family: parameters; the operations below float64 that a dispatch spy counts in the *stock*
float64 forward (``from_pretrained(dtype=torch.float64)``, nothing of curvlab's), and the most
frequent of them; the stock float64 logits against the stock float32 ones and against
curvlab's float64 ones (what a user gets without curvlab); the non-persistent buffers curvlab
recomputed in float64; custom autograd Functions run through their forward; then curvlab's
float32 and float64 models against the stock float32 forward (the fidelity check's number)
and the spy count in curvlab's float64 forward. Prints a Markdown table (docs/own-model.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import curvlab  # noqa: E402
from curvlab.models.float64 import LowPrecisionSpy, recompute_buffers  # noqa: E402
from curvlab.models.hf import load_stock, probe_batch  # noqa: E402
from curvlab.models.output import extract_logits  # noqa: E402
from tests import hf_families  # noqa: E402


def _logits(model, ids):
    with torch.no_grad():
        return extract_logits(model(ids)).double()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def measure(family: str, root: Path) -> dict:
    import transformers

    folder = hf_families.save(family, root / family)
    stock = load_stock(folder)
    ids = probe_batch(hf_families.VOCAB, 32)
    z32 = _logits(stock, ids)
    stock64 = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float64, local_files_only=True).eval()
    with LowPrecisionSpy() as spy:
        z_stock64 = _logits(stock64, ids)
    recomputed = recompute_buffers(stock64, lambda: type(stock64)(stock64.config))
    start = time.perf_counter()
    m64, info = curvlab.load_model(folder, dtype=torch.float64)
    load_s = time.perf_counter() - start
    with LowPrecisionSpy() as spy64:
        z64 = _logits(m64, ids)
    m32, _ = curvlab.load_model(folder, dtype=torch.float32)
    fid = m64.curvlab_fidelity
    return dict(
        family=family,
        params=sum(p.numel() for p in stock.parameters()),
        stock_ops=sum(spy.ops.values()),
        stock_top=", ".join(f"{k.split('.')[1]} ×{n}" for k, n in spy.ops.most_common(3)),
        stock64_vs_32=_rel(z_stock64, z32),
        buffers=", ".join(sorted({b.rpartition(".")[2] for b in recomputed})) or "-",
        unrolled=", ".join(sorted({n.split(" runs ")[1].split()[0] for n in fid.unrolled})) or "-",
        f32=_rel(_logits(m32, ids), z32),
        f64=_rel(z64, z32),
        stock64_vs_ours=_rel(z_stock64, z64),
        ops64=sum(spy64.ops.values()),
        load_s=load_s,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", action="append", choices=sorted(hf_families.FAMILIES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    import transformers

    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print("| family | parameters | stock float64: ops below float64 | stock float64 vs float32 "
          "| stock float64 vs curvlab float64 | recomputed buffers | custom Functions "
          "| curvlab f32 vs stock | curvlab f64 vs stock "
          "| curvlab f64: ops below float64 | f64 load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.family or list(hf_families.FAMILIES):
            if not hf_families.available(family):
                print(f"| {family} | not in transformers {transformers.__version__} |")
                continue
            r = measure(family, Path(tmp))
            stock = f"{r['stock_ops']} ({r['stock_top']})" if r["stock_ops"] else "0"
            print(f"| {r['family']} | {r['params']:,} | {stock} | {r['stock64_vs_32']:.1e} "
                  f"| {r['stock64_vs_ours']:.1e} "
                  f"| {r['buffers']} | {r['unrolled']} | {r['f32']:.1e} | {r['f64']:.1e} "
                  f"| {r['ops64']} | {r['load_s']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
