import numpy as np
import pytest
import torch

from curvlab.data import BatchStream, ByteTokenizer, DataSpec, default_text, load_corpus
from curvlab.errors import DataError


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "Gauss–Newton ∇²L, naïve café 🚀\n"
    ids = tok.encode(text)
    assert ids.max() < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text


def test_default_corpus_is_english_and_split():
    text = default_text()
    assert len(text) > 400_000 and " the " in text
    c = load_corpus()
    assert len(c.train) > 8 * len(c.val) > 0
    assert np.array_equal(np.concatenate([c.train, c.val]), ByteTokenizer().encode(text))


def test_batches_are_deterministic_and_shifted():
    spec = DataSpec(seq_len=16, batch_size=4, seed=7)
    s1, s2 = BatchStream(spec), BatchStream(spec)
    a, b = s1.batch(3), s2.batch(3)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert a.inputs.dtype == torch.int64 and a.inputs.shape == (4, 16)
    assert torch.equal(a.inputs[:, 1:], a.targets[:, :-1])
    assert not torch.equal(s1.batch(4).inputs, a.inputs)
    other = BatchStream(spec.replace(seed=8)).batch(3)
    assert not torch.equal(other.inputs, a.inputs)
    # batch i does not depend on the order of earlier draws
    s1.batch(0)
    assert torch.equal(s1.batch(3).inputs, a.inputs)


def test_fixed_seed_gives_fixed_tokens():
    # a pinned value: batches must be identical on any machine and Python version
    b = BatchStream(DataSpec(seq_len=8, batch_size=2, seed=0)).batch(0)
    tokens = BatchStream(DataSpec()).tokens
    rng = np.random.default_rng([0, 0, 0])
    start = rng.integers(0, len(tokens) - 8, size=2)[0]
    assert b.inputs[0].tolist() == tokens[start:start + 8].tolist()


def test_validation_split_differs():
    spec = DataSpec(seq_len=16, batch_size=4)
    train, val = BatchStream(spec), BatchStream(spec, split="val")
    assert len(val.tokens) < len(train.tokens)
    assert not torch.equal(train.batch(0).inputs, val.batch(0).inputs)


def test_contiguous_windows(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    (tmp_path / "train.bin").write_bytes(tokens.tobytes())
    (tmp_path / "val.bin").write_bytes(tokens[:200].tobytes())
    spec = DataSpec(source=str(tmp_path), seq_len=10, batch_size=3, windows="contiguous")
    s = BatchStream(spec)
    b = s.batch(2)
    for r in range(3):
        j = 2 * 3 + r
        assert b.inputs[r].tolist() == list(range(j * 10, j * 10 + 10))
        assert b.targets[r].tolist() == list(range(j * 10 + 1, j * 10 + 11))
    assert s.num_contiguous_batches == 999 // 10 // 3
    with pytest.raises(DataError, match="past the end"):
        s.batch(s.num_contiguous_batches)


def test_text_file_source(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello world " * 100)
    s = BatchStream(DataSpec(source=str(p), seq_len=8, batch_size=2))
    assert ByteTokenizer().decode(s.batch(0).inputs[0].numpy()) in ("hello world " * 3)


def test_bin_odd_byte_count(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match="odd byte count"):
        load_corpus(str(p))


def test_missing_source_and_vocab_check(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_corpus(str(tmp_path / "nope.txt"))
    p = tmp_path / "x.bin"
    p.write_bytes(np.array([1, 2, 300, 4] * 100, dtype="<u2").tobytes())
    s = BatchStream(DataSpec(source=str(p), seq_len=4, batch_size=1))
    with pytest.raises(DataError, match="token id 300 >= model vocab size 256"):
        s.check_vocab(256)
    s.check_vocab(301)


def test_load_corpus_reads_a_file_once_until_it_changes(tmp_path):
    import os

    path = tmp_path / "t.txt"
    path.write_text("the first text of this corpus. " * 20)
    first = load_corpus(str(path))
    assert load_corpus(str(path)) is first  # read and hashed once
    assert not first.train.flags.writeable  # shared: read-only
    path.write_text("another text, of another length. " * 20)
    os.utime(path, ns=(1, 1))  # a new modification time even on a coarse clock
    second = load_corpus(str(path))
    assert second is not first and second.sha256 != first.sha256
    assert load_corpus(str(path), 0.2) is not second  # another split
