"""Tokenizers: curvlab's byte tokenizer and Hugging Face tokenizers read from local files.

- ``byte``: UTF-8 bytes as tokens (vocabulary 256, no end-of-text token); what curvlab-trained
  models use unless told otherwise.
- a path: a ``tokenizer.json`` file, or a folder holding a Hugging Face tokenizer (a model
  folder saved with ``save_pretrained``, or one written by ``tokenizer.save_pretrained``).
  A ``tokenizer.json`` file is read with the ``tokenizers`` library; a folder with
  ``transformers.AutoTokenizer`` (as the model's authors call it; its fast tokenizer's Rust
  backend encodes), or with ``tokenizers`` from its ``tokenizer.json`` when ``transformers`` is
  not installed. Both libraries are optional and imported only here, when a tokenizer is
  loaded; nothing is downloaded (``local_files_only``).

A tokenizer has a ``name`` (``byte``, or the absolute path of its file or folder) and a
``sha256`` over its files (None for ``byte``), which checkpoints and HDF5 provenance record.
Documents are encoded without special tokens (no BOS/EOS added by the tokenizer's template)
and joined with the tokenizer's end-of-text token (:attr:`Tokenizer.eot_id`) when it has one.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from curvlab.errors import DataError

TOKENIZERS = ("auto", "byte")  # and a path
BYTE_VOCAB = 256
# files that make up a Hugging Face tokenizer (hashed when present)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "merges.txt", "vocab.txt")
# files that make a folder hold a tokenizer (configuration files alone do not)
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
# end-of-text tokens, in order of preference (before the configured eos token, which is
# the end-of-turn token of some chat models)
_EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>")
_EOS_NAMES = ("</s>", "<eos>", "<|eos|>")


class Tokenizer:
    """What curvlab needs of a tokenizer: ``encode_batch`` of documents into token ids."""

    name: str
    sha256: str | None
    vocab_size: int
    eot_id: int | None
    backend: str  # the library (and version) that encodes: part of the token cache key

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text (no special tokens added)."""
        raise NotImplementedError

    def encode(self, text: str) -> np.ndarray:
        """Token ids of one text (no special tokens added), int64."""
        return np.asarray(self.encode_batch([text])[0], dtype=np.int64)

    def decode(self, tokens: np.ndarray | list[int]) -> str:
        raise NotImplementedError

    @property
    def separator(self) -> np.ndarray:
        """Tokens placed between two documents: the end-of-text token, else a newline."""
        if self.eot_id is not None:
            return np.array([self.eot_id], dtype=np.int64)
        return self.encode("\n")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens (vocab 256); ``decode(encode(s)) == s`` for any string."""

    name = "byte"
    sha256 = None
    vocab_size = BYTE_VOCAB
    eot_id = None
    backend = "byte"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, tokens: np.ndarray | list[int]) -> str:
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def has_tokenizer(folder: str | Path) -> bool:
    """True if ``folder`` holds a Hugging Face tokenizer (``tokenizer.json``,
    ``tokenizer.model``, ``vocab.json``, ...)."""
    folder = Path(folder)
    return folder.is_dir() and any((folder / f).is_file() for f in _VOCAB_FILES)


def tokenizer_files(path: str | Path) -> list[Path]:
    """The files of the tokenizer at ``path`` (a ``tokenizer.json``-like file, or a folder)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"tokenizer not found: {path}")
    if path.is_file():
        return [path]
    if not has_tokenizer(path):
        raise DataError(f"{path}: folder holds no tokenizer (none of {', '.join(_VOCAB_FILES)})")
    return [path / f for f in TOKENIZER_FILES if (path / f).is_file()]


def tokenizer_sha256(path: str | Path) -> str:
    """SHA-256 over the names and contents of a tokenizer's files (see :func:`tokenizer_files`)."""
    h = hashlib.sha256()
    for f in tokenizer_files(path):
        try:
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
        except OSError as e:
            raise DataError(f"{f}: cannot read ({e.strerror})") from None
        h.update(f"{f.name}\0{digest}\n".encode())
    return h.hexdigest()


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer from local files (``tokenizer.json`` or a tokenizer folder)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path).resolve()
        self.name = str(path)
        self.sha256 = tokenizer_sha256(path)  # also checks that the files exist
        json_file = path if path.is_file() else path / "tokenizer.json"
        config = _read_config(path / "tokenizer_config.json") if path.is_dir() else {}
        # a folder: as transformers.AutoTokenizer sets it up (it may adjust the tokenizer.json
        # pipeline from tokenizer_config.json), when transformers is there or needed
        auto = None
        if path.is_dir() and (_importable("transformers") or not json_file.is_file()):
            auto = _load_transformers(path)
        backend = getattr(auto, "backend_tokenizer", None) if auto is not None else None
        if auto is None:
            backend = _load_tokenizers_json(json_file)
            self.backend = f"tokenizers {_version('tokenizers')}"
        else:
            self.backend = f"transformers {_version('transformers')} {type(auto).__name__}"
        if backend is not None:  # a fast (Rust) tokenizer
            self._encode = functools.partial(_encode_fast, backend)
            self._decode = backend.decode
            self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
            token_id = backend.token_to_id
        else:  # a slow (Python) transformers tokenizer
            self._encode = functools.partial(_encode_transformers, auto)
            self._decode = auto.decode
            self.vocab_size = len(auto)
            unk = getattr(auto, "unk_token_id", None)

            def token_id(tok: str) -> int | None:
                i = auto.convert_tokens_to_ids(tok)
                return None if i is None or i == unk else int(i)
        self.eot_id = _find_eot(token_id, config)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return self._encode(list(texts))

    def decode(self, tokens: np.ndarray | list[int]) -> str:
        return self._decode([int(t) for t in tokens])


def _importable(module: str) -> bool:
    import importlib.util
    import sys

    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version(module: str) -> str:
    import importlib

    return str(getattr(importlib.import_module(module), "__version__", "?"))


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable tokenizer config ({e})") from None
    return config if isinstance(config, dict) else {}


def _find_eot(token_id, config: Mapping[str, Any]) -> int | None:
    eos = config.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    names = list(_EOT_NAMES) + ([eos] if isinstance(eos, str) else []) + list(_EOS_NAMES)
    for name in names:
        i = token_id(name)
        if i is not None:
            return int(i)
    return None


def _load_tokenizers_json(path: Path):
    try:
        import tokenizers
    except ImportError:
        raise DataError(f"reading the tokenizer {path} needs the optional package 'tokenizers' "
                        "(pip install tokenizers)") from None
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises plain Exceptions
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: not a Hugging Face tokenizer file ({msg[:200]})") from None


def _load_transformers(path: Path):
    try:
        import transformers
    except ImportError:
        raise DataError(f"reading the tokenizer in {path} (no tokenizer.json) needs the optional "
                        "package 'transformers' (pip install transformers)") from None
    transformers.utils.logging.set_verbosity_error()
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # many types for unreadable or incomplete folders
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot load the tokenizer ({msg[:200]})") from None


def _encode_fast(backend, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, dtype=np.int64)
            for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def _encode_transformers(auto, texts: list[str]) -> list[np.ndarray]:
    ids = auto(texts, add_special_tokens=False)["input_ids"]
    return [np.asarray(x, dtype=np.int64) for x in ids]


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str, stamp: tuple) -> HFTokenizer:
    return HFTokenizer(path)


def load_tokenizer(choice: str, expect_sha256: str | None = None) -> Tokenizer:
    """``byte`` or the tokenizer at a path (see module docstring).

    ``expect_sha256``: the hash recorded with it (in a checkpoint); tokenizer files that changed
    since are an error. A tokenizer is loaded once while its files are unchanged.
    """
    if choice == "byte":
        return ByteTokenizer()
    if choice in ("auto", "none"):
        raise DataError(f"tokenizer {choice!r} is not a tokenizer (auto is resolved first)")
    path = Path(choice).resolve()
    files = tokenizer_files(path)
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    tok = _cached_tokenizer(str(path), stamp)
    if expect_sha256 is not None and tok.sha256 != expect_sha256:
        raise DataError(
            f"tokenizer {path} changed since it was recorded (sha256 {expect_sha256[:12]}... "
            f"then, {tok.sha256[:12]}... now); pass --tokenizer {choice} to use it as it is")
    return tok


def auto_tokenizer(kind: str | None, model_path: str | Path | None = None,
                   recorded: Mapping[str, Any] | None = None) -> tuple[str, str | None]:
    """What ``tokenizer="auto"`` means for a model: ``(choice, sha256)`` with ``choice``
    ``byte``, a tokenizer path, or ``none`` (no tokenizer known).

    ``kind``: None for a freshly built curvlab model (``byte``); ``huggingface`` for a model
    folder (its tokenizer if it ships one); ``curvlab`` for a curvlab checkpoint (the tokenizer
    recorded in its data spec; a checkpoint from before tokenizers were recorded: ``byte`` if it
    was trained on text, ``none`` on token files); anything else (a nanoGPT checkpoint):
    ``none``.
    """
    if kind is None:
        return "byte", None
    if kind == "huggingface":
        if model_path is not None and has_tokenizer(model_path):
            return str(Path(model_path).resolve()), None
        return "none", None
    if kind != "curvlab":
        return "none", None
    recorded = dict(recorded or {})
    choice = recorded.get("tokenizer")
    if isinstance(choice, str) and choice not in ("auto", ""):
        return choice, recorded.get("tokenizer_sha256")
    from curvlab.data.sources import is_token_source

    return ("none" if is_token_source(recorded.get("source", "default")) else "byte"), None
