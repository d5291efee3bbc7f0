"""Tokenizers. The default is byte-level: token = UTF-8 byte, vocabulary 256."""

from __future__ import annotations

import numpy as np

TOKENIZERS = ("byte", "none")


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256); ``decode(encode(s)) == s`` for any string."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, tokens: np.ndarray | list[int]) -> str:
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")
