"""Data: the embedded corpus, user text and token files, deterministic batches."""

from curvlab.data.batches import (
    WINDOWS,
    Batch,
    BatchStream,
    DataSpec,
    analysis_batches,
    analysis_spec,
)
from curvlab.data.corpus import Corpus, default_text, load_corpus, source_tokenizer
from curvlab.data.tokenizer import ByteTokenizer

__all__ = [
    "WINDOWS",
    "analysis_batches",
    "analysis_spec",
    "Batch",
    "BatchStream",
    "ByteTokenizer",
    "Corpus",
    "DataSpec",
    "default_text",
    "load_corpus",
    "source_tokenizer",
]
