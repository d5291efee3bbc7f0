"""Data: the embedded corpus, user text (plain, jsonl, Parquet, folders) and token files
(.bin, .npy), tokenizers (byte, Hugging Face), the token cache, deterministic batches."""

from curvlab.data.batches import (
    WINDOWS,
    Batch,
    BatchStream,
    DataSpec,
    analysis_batches,
    analysis_spec,
    bind_tokenizer,
)
from curvlab.data.cache import cache_dir
from curvlab.data.corpus import (
    SPLITS,
    Corpus,
    JoinedTokens,
    default_text,
    load_corpus,
    source_tokenizer,
)
from curvlab.data.sources import is_token_source, resolve_source
from curvlab.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    auto_tokenizer,
    has_tokenizer,
    load_tokenizer,
    tokenizer_sha256,
)

__all__ = [
    "SPLITS",
    "WINDOWS",
    "analysis_batches",
    "analysis_spec",
    "auto_tokenizer",
    "bind_tokenizer",
    "Batch",
    "BatchStream",
    "ByteTokenizer",
    "cache_dir",
    "Corpus",
    "DataSpec",
    "default_text",
    "has_tokenizer",
    "HFTokenizer",
    "is_token_source",
    "JoinedTokens",
    "load_corpus",
    "load_tokenizer",
    "resolve_source",
    "source_tokenizer",
    "Tokenizer",
    "tokenizer_sha256",
]
