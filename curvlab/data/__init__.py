"""Data: the embedded corpus, user text and token files, deterministic batches."""

from curvlab.data.batches import WINDOWS, Batch, BatchStream, DataSpec
from curvlab.data.corpus import Corpus, default_text, load_corpus
from curvlab.data.tokenizer import ByteTokenizer

__all__ = [
    "WINDOWS",
    "Batch",
    "BatchStream",
    "ByteTokenizer",
    "Corpus",
    "DataSpec",
    "default_text",
    "load_corpus",
]
