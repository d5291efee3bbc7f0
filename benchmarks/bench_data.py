"""Loading a large jsonl corpus: first load (tokenize + cache) vs repeated load (cache hit).

    python benchmarks/bench_data.py [--mb 100] [--vocab 8192] [--keep DIR]

Everything is made here, in a temporary folder: a jsonl corpus of about ``--mb`` MB (documents
of 1-6 KB drawn from paragraphs of curvlab's embedded English corpus, each with a random
numeric tag so that no two are alike), and a byte-level BPE tokenizer trained on its first 8 MB
with the ``tokenizers`` library. Each measurement runs in a fresh Python process (so that
nothing is kept in memory between them and the peak RSS is that load's own), with the token
cache in the temporary folder. Reported: wall time, corpus MB per second, peak RSS of the
process, tokens. Batches: 100 random windows of 8x1024 tokens drawn from the memory-mapped
cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_corpus(path: Path, mb: float, seed: int = 0) -> int:
    """Write about ``mb`` MB of jsonl documents to ``path``; returns the number of documents."""
    import numpy as np

    from curvlab.data import default_text

    paragraphs = [p.strip() for p in default_text().split("\n\n") if len(p.strip()) > 80]
    rng = np.random.default_rng(seed)
    target, written, n = int(mb * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            parts, size = [], int(rng.integers(1000, 6000))
            while sum(len(p) for p in parts) < size:
                parts.append(paragraphs[int(rng.integers(len(paragraphs)))])
            doc = f"[{int(rng.integers(1_000_000))}] " + "\n\n".join(parts)
            line = json.dumps({"id": n, "text": doc}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
            n += 1
    return n


def train_tokenizer(corpus: Path, out: Path, vocab: int, sample_mb: float = 8) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        seen = 0
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                seen += len(line)
                yield json.loads(line)["text"]
                if seen > sample_mb * 1e6:
                    return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts(), trainer=trainer)
    tok.save(str(out))


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import curvlab

    t0 = time.perf_counter()
    corpus = curvlab.load_corpus(args.corpus, tokenizer=args.tokenizer)
    seconds = time.perf_counter() - t0
    row = {"seconds": seconds, "tokens": corpus.num_tokens,
           "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if args.batches:
        spec = curvlab.DataSpec(source=args.corpus, tokenizer=args.tokenizer, seq_len=1024,
                                batch_size=8)
        stream = curvlab.BatchStream(spec, corpus=corpus)
        t0 = time.perf_counter()
        for i in range(args.batches):
            stream.batch(i)
        row["batch_seconds"] = (time.perf_counter() - t0) / args.batches
    print(json.dumps(row))


def measure(corpus: Path, tokenizer: str, cache: str, batches: int = 0) -> dict:
    env = dict(os.environ, CURVLAB_CACHE=cache)
    cmd = [sys.executable, __file__, "--child", "--corpus", str(corpus), "--tokenizer",
           tokenizer, "--batches", str(batches)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    row["process_seconds"] = time.perf_counter() - t0
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=100)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--keep", default=None, help="Work in this folder and keep it.")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--batches", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    root = Path(args.keep or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    corpus, tok = root / "corpus.jsonl", root / "tokenizer.json"
    t0 = time.perf_counter()
    docs = make_corpus(corpus, args.mb)
    mb = corpus.stat().st_size / 1e6
    print(f"corpus: {mb:.1f} MB, {docs:,} documents ({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    train_tokenizer(corpus, tok, args.vocab)
    print(f"tokenizer: byte-level BPE, vocabulary {args.vocab:,}, trained on 8 MB "
          f"({time.perf_counter() - t0:.1f} s)")
    cache = str(root / "cache")
    rows = [
        (f"BPE {args.vocab}: first load (tokenize, write cache)", measure(corpus, str(tok),
                                                                          cache)),
        (f"BPE {args.vocab}: repeated load (cache hit)", measure(corpus, str(tok), cache, 100)),
        (f"BPE {args.vocab}: cache off (tokenize in memory)", measure(corpus, str(tok), "off")),
        ("byte: first load", measure(corpus, "byte", cache)),
        ("byte: repeated load", measure(corpus, "byte", cache)),
    ]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; load: time of load_corpus in a fresh process; peak "
          "RSS: of that whole process (Python, torch and curvlab included)\n")
    print("| case | load (s) | MB/s | peak RSS (MiB) | tokens |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['seconds']:.2f} | {mb / r['seconds']:.0f} | "
              f"{r['rss'] / 2**20:.0f} | {r['tokens']:,} |")
    hit = rows[1][1]
    print(f"\n100 random batches of 8x1024 tokens from the memory-mapped cache: "
          f"{hit['batch_seconds'] * 1e3:.2f} ms per batch")
    print(f"repeated load / first load: {hit['seconds'] / rows[0][1]['seconds']:.4f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
