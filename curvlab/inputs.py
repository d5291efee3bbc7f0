"""The inputs of an analysis: a checkpoint's model and the analysis batches its data options
describe, and their ``data`` provenance. Shared by ``curvlab extract``, ``spectrum``, ``verify``,
``compare`` and :func:`curvlab.spectra_along` (the CLI re-exports them from ``curvlab.cli``).
"""

from __future__ import annotations

from typing import Any

import curvlab
from curvlab import distributed


def load_analysis_inputs(checkpoint: str, data_source, batch_size, seq_len, num_batches, seed,
                         windows, split, dtype: str | None = None, device: str | None = None,
                         tokenizer: str | None = None, text_field: str | None = None):
    """Load a checkpoint and the analysis batches its data options describe.

    The tokenizer of text sources is resolved for the model (``--tokenizer auto``, see
    :func:`curvlab.data.bind_tokenizer`); notes on the data (a split cut from one file) are
    appended to ``info.notes``."""
    import torch

    torch_dtype = {"float32": torch.float32, "float64": torch.float64, None: None}[dtype]
    device = distributed.local_device(device or "cpu")  # torchrun + NCCL: this rank's GPU
    model, info = curvlab.load_model(checkpoint, device=device, dtype=torch_dtype)
    base = dict(info.data)
    base.setdefault("seq_len", min(info.seq_len, 64))
    spec = curvlab.data.analysis_spec(base, source=data_source, batch_size=batch_size,
                                      seq_len=seq_len, seed=seed, windows=windows,
                                      tokenizer=tokenizer, text_field=text_field)
    if spec.seq_len > info.seq_len and info.learned_positions:
        raise curvlab.errors.DataError(
            f"--seq-len {spec.seq_len} exceeds the model's {info.seq_len} positions")
    auto = curvlab.data.auto_tokenizer(info.kind, checkpoint, info.data)
    spec = curvlab.data.bind_tokenizer(spec, auto, info.vocab_size)
    batches = curvlab.data.analysis_batches(spec, num_batches, info.vocab_size, split)
    corpus = spec.corpus()
    if split != "all" and corpus.val_fraction is not None and spec.source != "default":
        part = corpus.split(split)
        info.notes.append(
            f"{spec.source} is one stream: --split {split} uses "
            f"{'its first' if split == 'train' else 'its last'} "
            f"{len(part):,} of {corpus.num_tokens:,} tokens; --split all uses all of them")
    if distributed.active():  # every rank: the same model, its rows of every batch
        distributed.check_same("model", {"checkpoint": checkpoint,
                                         "checksum": _param_checksum(model)})
        batches = [b.shard() for b in batches]
    return model, info, spec, batches


def _param_checksum(model) -> str:
    """A float64 checksum of the parameters (same checkpoint on every torchrun rank?)."""
    return repr([float(p.detach().double().sum()) for p in model.parameters()])


def data_provenance(spec, batches, split: str) -> dict[str, Any]:
    """The ``data`` provenance of an analysis: the spec plus what was actually used (the
    tokenizer applied, ``none`` for token files, and the hash of its files)."""
    corpus = spec.corpus()
    d = spec.to_dict()
    d.update(batches=len(batches), split=split,
             tokens=int(sum(b.token_range[1] for b in batches)),  # whole batches (all ranks)
             tokenizer=corpus.tokenizer, tokenizer_sha256=corpus.tokenizer_sha256,
             corpus_sha256=corpus.sha256)
    return d
