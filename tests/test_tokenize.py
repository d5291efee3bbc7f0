"""Text as the model expects it: Hugging Face tokenizers, jsonl / Parquet / folder sources,
large-vocabulary token files, the token cache, and one-line errors for every bad input."""

import json
import shutil

import numpy as np
import pytest
import torch

import curvlab
from curvlab import store
from curvlab.cli import load_analysis_inputs
from curvlab.data import BatchStream, DataSpec, bind_tokenizer, load_corpus
from curvlab.data import corpus as corpus_module
from curvlab.errors import DataError
from tests.cli_helpers import assert_clean_error, run_cli

tokenizers = pytest.importorskip("tokenizers", reason="optional dependency tokenizers missing")

EOT = "<|endoftext|>"
DOCS = ["The cat sat on the mat.", "Gauss-Newton steps, naïve café 🚀\nsecond line",
        "  leading spaces and a tab\tend", "the last document of the corpus"]
TEXT = "the quick brown fox jumps over the lazy dog\n" * 30 + "Curvature of the loss.\n" * 20


def _bpe(path, vocab=300, text=TEXT):
    """A byte-level BPE tokenizer trained here (vocabulary up to ``vocab``), saved to
    ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text] + DOCS, trainer=trainer)
    tok.save(str(path))
    return tok


def _words(path, words):
    """A word-level tokenizer over ``words`` (ids < 256: fits the byte-vocabulary presets)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate([EOT, "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return tok


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def _joined(tok, docs):
    """The expected stream of ``docs``: each encoded, the end-of-text id between them."""
    eot = tok.token_to_id(EOT)
    out = []
    for i, d in enumerate(docs):
        out += ([eot] if i else []) + _ids(tok, d)
    return out


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny LlamaForCausalLM saved with its tokenizer, and the same folder without it."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    tok = _bpe(root / "tok.json")
    vocab = tok.get_vocab_size()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    with_tok, without = root / "with", root / "without"
    model.save_pretrained(with_tok)
    model.save_pretrained(without)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT)
    fast.save_pretrained(with_tok)
    text = root / "corpus.txt"
    text.write_text(TEXT)
    return {"tok": tok, "vocab": vocab, "with": with_tok, "without": without, "text": text,
            "root": root}


def test_auto_is_the_model_folders_tokenizer(hf_model, tmp_path, capsys):
    folder, tok = hf_model["with"], hf_model["tok"]
    auto = curvlab.data.auto_tokenizer("huggingface", folder)
    spec = bind_tokenizer(DataSpec(source=str(hf_model["text"])), auto, hf_model["vocab"])
    assert spec.tokenizer == str(folder.resolve())
    assert spec.tokenizer_sha256 == curvlab.data.tokenizer_sha256(folder)
    corpus = spec.corpus()
    from transformers import AutoTokenizer

    direct = AutoTokenizer.from_pretrained(folder)(TEXT, add_special_tokens=False)["input_ids"]
    whole = np.concatenate([corpus.train, corpus.val]).tolist()
    assert whole == direct == _ids(tok, TEXT)
    assert max(whole) > 255  # not bytes
    assert corpus.eot_id == tok.token_to_id(EOT)
    # through the CLI: the batches are that tokenizer's ids, and the results file says so
    out = tmp_path / "s.h5"
    code, stdout, err = run_cli(capsys, "spectrum", folder, "--data", hf_model["text"],
                                "--seq-len", 8, "--batch-size", 2, "--k", 2, "--windows",
                                "contiguous", "-o", out)
    assert code == 0, err
    assert "note: " in stdout and "--split all" in stdout  # one file cut into train / val
    data = store.read(out).attrs["data"]
    assert data["tokenizer"] == str(folder.resolve())
    assert data["tokenizer_sha256"] == curvlab.data.tokenizer_sha256(folder)
    assert data["corpus_sha256"] == corpus.sha256
    batch = BatchStream(DataSpec(**{k: data[k] for k in ("source", "seq_len", "batch_size",
                                                         "windows", "tokenizer")})).batch(0)
    assert batch.inputs[0].tolist() == direct[:8]
    # the default corpus is text too: the same tokenizer
    _, _, spec, batches = load_analysis_inputs(folder, None, 2, 8, 1, None, "contiguous",
                                               "train")
    head = curvlab.data.default_text()[:2000]
    assert spec.tokenizer == str(folder.resolve())
    assert batches[0].inputs.flatten().tolist() == _ids(tok, head)[:16]


def test_model_without_tokenizer_refuses_text(hf_model, tmp_path, capsys):
    folder = hf_model["without"]
    vocab = hf_model["vocab"]
    err = assert_clean_error(capsys, "spectrum", folder, "--data", hf_model["text"],
                             "--seq-len", 8, "-o", tmp_path / "x.h5", match=f"vocabulary {vocab}")
    assert "--tokenizer" in err and ".bin/.npy" in err
    assert not (tmp_path / "x.h5").exists()
    assert_clean_error(capsys, "verify", folder, "--data", hf_model["text"], "--seq-len", 8,
                       match=f"vocabulary {vocab}")
    # the default corpus is text too
    assert_clean_error(capsys, "verify", folder, "--seq-len", 8, match="the default corpus is "
                                                                      "text")
    # the way out: the tokenizer file (what the commands load: these batches)
    _, _, spec, batches = load_analysis_inputs(folder, str(hf_model["text"]), 2, 8, 1, None,
                                               "contiguous", "train",
                                               tokenizer=str(hf_model["root"] / "tok.json"))
    assert spec.tokenizer == str((hf_model["root"] / "tok.json").resolve())
    assert batches[0].inputs.flatten().tolist() == _ids(hf_model["tok"], TEXT)[:16]


def test_checkpoint_records_its_tokenizer(tmp_path, capsys):
    tok_path = tmp_path / "words.json"
    words = sorted(set(TEXT.replace(".", " ").split()))
    tok = _words(tok_path, words)
    ckpt = tmp_path / "m.pt"
    code, _, err = run_cli(capsys, "init", "--preset", "tiny", "--seq-len", 16, "--data",
                           tmp_path / "none.txt", "-o", ckpt)
    assert code != 0  # a missing source is refused before anything is written
    text = tmp_path / "c.txt"
    text.write_text(TEXT)
    code, _, err = run_cli(capsys, "init", "--preset", "tiny", "--seq-len", 16, "--data", text,
                           "--tokenizer", tok_path, "-o", ckpt)
    assert code == 0, err
    _, info = curvlab.load_checkpoint(ckpt)
    assert info.data["tokenizer"] == str(tok_path.resolve())
    assert info.data["tokenizer_sha256"] == curvlab.data.tokenizer_sha256(tok_path)
    # an analysis of the checkpoint reads text with the recorded tokenizer
    out = tmp_path / "s.h5"
    code, _, err = run_cli(capsys, "spectrum", ckpt, "--k", 2, "--batch-size", 1, "-o", out)
    assert code == 0, err
    data = store.read(out).attrs["data"]
    assert data["tokenizer"] == str(tok_path.resolve())
    corpus = load_corpus(str(text), tokenizer=str(tok_path))
    assert np.concatenate([corpus.train, corpus.val]).tolist() == _ids(tok, TEXT)
    # the tokenizer's files changed since: refused (an explicit --tokenizer is taken as is)
    _words(tok_path, words[::-1])
    assert_clean_error(capsys, "spectrum", ckpt, "--k", 2, "-o", tmp_path / "t.h5",
                       match="changed since it was recorded")
    _, _, spec, _ = load_analysis_inputs(str(ckpt), None, 1, None, 1, None, None, "train",
                                         tokenizer=str(tok_path))
    assert spec.tokenizer_sha256 == curvlab.data.tokenizer_sha256(tok_path)


def test_train_resume_refuses_a_changed_tokenizer(tmp_path, capsys):
    tok_path = tmp_path / "words.json"
    words = sorted(set(TEXT.replace(".", " ").split()))
    _words(tok_path, words)
    text = tmp_path / "c.txt"
    text.write_text(TEXT)
    out = tmp_path / "run"

    def train(tokenizer, *more):
        return ["train", "--optimizer", "adamw", "--preset", "tiny", "--data", text,
                "--tokenizer", tokenizer, "--seq-len", 8, "--micro-batch-size", 2,
                "--eval-batches", 1, "--checkpoint-every", 1, "--no-progress", "--out", out,
                *more]

    code, _, err = run_cli(capsys, *train(tok_path, "--max-steps", 1))
    assert code == 0, err
    _, info = curvlab.load_checkpoint(out / "final.pt")
    assert info.data["tokenizer"] == str(tok_path.resolve())
    assert info.data["tokenizer_sha256"] == curvlab.data.tokenizer_sha256(tok_path)
    _words(tok_path, words[::-1])  # same path, other ids
    assert_clean_error(capsys, *train(tok_path, "--max-steps", 2, "--resume"),
                       match="cannot resume")
    assert_clean_error(capsys, *train("byte", "--max-steps", 2, "--resume"),
                       match="changed options: tokenizer")


def test_jsonl_parquet_and_folder_sources(tmp_path):
    tok = _bpe(tmp_path / "tok.json")
    name = str(tmp_path / "tok.json")
    expected = _joined(tok, DOCS)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" + ("\n" if i == 1 else "")
                             for i, d in enumerate(DOCS)))
    c = load_corpus(str(jsonl), tokenizer=name)
    assert np.concatenate([c.train, c.val]).tolist() == expected
    assert c.split("all").tolist() == expected
    other = tmp_path / "o.jsonl"
    other.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    assert load_corpus(str(other), tokenizer=name, text_field="body").sha256 == c.sha256
    # byte tokenizer: no end-of-text token, documents joined with a newline
    b = load_corpus(str(jsonl))
    assert bytes(b.split("all").tolist()) == "\n".join(DOCS).encode()
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(DOCS))), "text": DOCS}),
                   tmp_path / "d.parquet", row_group_size=2)
    p = load_corpus(str(tmp_path / "d.parquet"), tokenizer=name)
    assert p.split("all").tolist() == expected and p.sha256 == c.sha256
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    for i, d in enumerate(DOCS):
        (folder / ("sub" if i == 3 else "") / f"{i}.txt").write_text(d)
    f = load_corpus(str(folder), tokenizer=name)
    assert f.split("all").tolist() == expected
    # train.X / val.X: the two files are the splits, and `all` is both without a copy
    split = tmp_path / "split"
    split.mkdir()
    (split / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:3]))
    (split / "val.jsonl").write_text(json.dumps({"text": DOCS[3]}) + "\n")
    s = load_corpus(str(split), tokenizer=name)
    assert s.train.tolist() == _joined(tok, DOCS[:3]) and s.val.tolist() == _ids(tok, DOCS[3])
    both = s.split("all")
    assert len(both) == len(s.train) + len(s.val)
    idx = np.array([[0, len(s.train) - 1], [len(s.train), len(both) - 1]])
    assert both[idx].tolist() == np.asarray(both)[idx].tolist()


def test_npy_token_files_of_a_large_vocabulary(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100_000, 5000)
    ids[17] = 99_999
    for dtype in (np.int64, np.int32, np.uint32):
        path = tmp_path / f"t_{np.dtype(dtype).name}.npy"
        np.save(path, ids.astype(dtype))
        c = load_corpus(str(path))
        assert c.tokenizer == "none" and c.max_token == 99_999
        assert np.concatenate([c.train, c.val]).tolist() == ids.tolist()
    stream = BatchStream(DataSpec(source=str(path), seq_len=16, batch_size=3,
                                  windows="contiguous"), split="all")
    b = stream.batch(1)
    assert b.inputs.dtype == torch.int64
    assert b.inputs[0].tolist() == ids[48:64].tolist() and b.targets[2].tolist() == \
        ids[81:97].tolist()
    stream.check_vocab(100_000)
    with pytest.raises(DataError, match="token id 99999 >= model vocab size 99999"):
        stream.check_vocab(99_999)


def test_splits_and_the_too_short_suggestion(tmp_path, capsys):
    path = tmp_path / "val.bin"
    np.arange(30, dtype="<u2").tofile(path)
    c = load_corpus(str(path))
    assert len(c.train) == 27 and c.split("all").tolist() == list(range(30))
    with pytest.raises(DataError, match="--split all uses all 30 tokens"):
        BatchStream(DataSpec(source=str(path), seq_len=28))
    s = BatchStream(DataSpec(source=str(path), seq_len=28, batch_size=1, windows="contiguous"),
                    split="all")
    assert s.batch(0).inputs[0].tolist() == list(range(28))
    ckpt = curvlab.save_checkpoint(tmp_path / "m.pt", curvlab.build_model(
        curvlab.preset("tiny", seq_len=32)))
    err = assert_clean_error(capsys, "verify", ckpt, "--data", path, "--seq-len", 28,
                             match="--split all")
    assert "train split has 27 tokens" in err
    code, stdout, err = run_cli(capsys, "verify", ckpt, "--data", path, "--seq-len", 28,
                                "--split", "all", "--blocks", "norm.weight")
    assert code == 0, err


def test_token_cache(tmp_path, monkeypatch):
    tok = _bpe(tmp_path / "tok.json")
    name = str(tmp_path / "tok.json")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 3))
    cache = tmp_path / "cache"
    monkeypatch.setenv("CURVLAB_CACHE", str(cache))
    first = load_corpus(str(jsonl), tokenizer=name)
    entries = sorted(p.suffix for p in (cache / "tokens").iterdir())
    assert entries == [".json", ".tokens"]
    assert isinstance(first.whole, np.memmap) and first.whole.dtype == np.uint16
    corpus_module._load_cached.cache_clear()

    def no_encoding(*args, **kwargs):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as m:
        m.setattr(curvlab.data.HFTokenizer, "encode_batch", no_encoding)
        again = load_corpus(str(jsonl), tokenizer=name)  # from the cache
    assert again.sha256 == first.sha256 and again.split("all").tolist() == \
        _joined(tok, DOCS * 3)
    # another tokenizer (or other file contents) is another entry
    _bpe(tmp_path / "tok2.json", vocab=280)
    load_corpus(str(jsonl), tokenizer=str(tmp_path / "tok2.json"))
    assert len(list((cache / "tokens").glob("*.tokens"))) == 2
    # off: nothing written, same tokens
    monkeypatch.setenv("CURVLAB_CACHE", "off")
    shutil.rmtree(cache)
    corpus_module._load_cached.cache_clear()
    off = load_corpus(str(jsonl), tokenizer=name)
    assert not cache.exists() and off.sha256 == first.sha256
    # a truncated entry is not trusted
    monkeypatch.setenv("CURVLAB_CACHE", str(cache))
    corpus_module._load_cached.cache_clear()
    load_corpus(str(jsonl), tokenizer=name)
    entry = next((cache / "tokens").glob("*.tokens"))
    entry.write_bytes(entry.read_bytes()[:10])
    corpus_module._load_cached.cache_clear()
    assert load_corpus(str(jsonl), tokenizer=name).sha256 == first.sha256


def test_text_files_are_encoded_in_pieces_cut_at_line_starts(tmp_path, monkeypatch):
    tok = _bpe(tmp_path / "tok.json")
    monkeypatch.setattr(curvlab.data.sources, "PIECE_BYTES", 64)
    path = tmp_path / "t.txt"
    text = "".join(f"line {i}: the cat sat\n  indented\n\n" for i in range(40))
    path.write_text(text)
    c = load_corpus(str(path), tokenizer=str(tmp_path / "tok.json"), cache=False)
    assert c.split("all").tolist() == _ids(tok, text)  # byte-level BPE: the same ids
    b = load_corpus(str(path), cache=False)
    assert bytes(b.split("all").tolist()) == text.encode()


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    ckpt = curvlab.save_checkpoint(tmp_path / "m.pt", curvlab.build_model(
        curvlab.preset("tiny", vocab_size=300, seq_len=16)), data={"source": "default"})

    def refused(path, match, *extra):
        assert_clean_error(capsys, "verify", ckpt, "--data", path, "--seq-len", 8, *extra,
                           match=match)

    def write(name, content):
        p = tmp_path / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return p

    refused(write("e.txt", ""), "e.txt: text file is empty")
    refused(write("bad.txt", b"ok\n\xff\xfe"), "bad.txt: not UTF-8 text (invalid start byte at "
                                               "byte 3)")
    refused(write("e.jsonl", "\n\n"), "e.jsonl: no documents")
    lines = [json.dumps({"text": "fine " * 20})] * 2
    refused(write("f.jsonl", "\n".join(lines + [json.dumps({"body": "x"})])),
            "f.jsonl: line 3 has no field 'text' (fields: body; --text-field")
    refused(write("j.jsonl", "\n".join(lines + ["{oops"])), "j.jsonl: line 3 is not JSON")
    refused(write("n.jsonl", json.dumps({"text": 3})), "n.jsonl: line 1: field 'text' is a JSON "
                                                      "int, not a string")
    refused(write("l.jsonl", "[1, 2]"), "l.jsonl: line 1 is a JSON list")
    refused(write("e.npy", b""), "e.npy: token file is empty")
    refused(write("g.npy", b"garbage garbage"), "g.npy: not a .npy array file")
    np.save(tmp_path / "f.npy", np.ones(100, np.float32))
    refused(tmp_path / "f.npy", "f.npy: .npy array holds float32 values")
    np.save(tmp_path / "m.npy", np.ones((10, 10), np.int32))
    refused(tmp_path / "m.npy", "m.npy: .npy array has shape (10, 10)")
    np.save(tmp_path / "neg.npy", np.array([1, 2, -5] * 20, np.int32))
    refused(tmp_path / "neg.npy", "neg.npy: token id -5 < 0")
    np.save(tmp_path / "big.npy", np.array([1, 2, 70_000] * 20, np.int64))
    refused(tmp_path / "big.npy", "token id 70000 >= model vocab size 300")
    (tmp_path / "half").mkdir()
    np.save(tmp_path / "half" / "train.npy", np.arange(100))
    refused(tmp_path / "half", "half: folder has train.npy but no val.npy")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "empty: folder holds neither")
    refused(tmp_path / "d.jsonl", "data source not found")
    refused(write("ok.txt", TEXT), "tokenizer not found", "--tokenizer", tmp_path / "no.json")
    refused(tmp_path / "ok.txt", "not a Hugging Face tokenizer file", "--tokenizer",
            write("junk.json", "{}"))
    refused(tmp_path / "ok.txt", "folder holds no tokenizer", "--tokenizer", tmp_path / "empty")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "c.parquet")
    refused(tmp_path / "c.parquet", "c.parquet: no column 'text' (columns: body; --text-field")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "t.parquet")
    refused(tmp_path / "t.parquet", "t.parquet: column 'text' holds int64, not text")
    pq.write_table(pa.table({"text": ["fine " * 30, None]}), tmp_path / "null.parquet")
    refused(tmp_path / "null.parquet", "null.parquet: column 'text' is null in row 2")
    refused(write("x.parquet", "not parquet at all"), "x.parquet: not a Parquet file")
    _, _, spec, batches = load_analysis_inputs(str(ckpt), str(tmp_path / "c.parquet"), 1, 2, 1,
                                               None, "contiguous", "all", text_field="body")
    assert batches[0].inputs.tolist() == [[ord("a"), ord("\n")]]


def test_token_sources_record_no_tokenizer_unless_named(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(100, dtype="<u2").tofile(path)
    tok = tmp_path / "tok.json"
    _bpe(tok)
    # a model started from bytes (auto: byte) and trained on token files knows no tokenizer
    assert bind_tokenizer(DataSpec(source=str(path)), ("byte", None), 50_304).tokenizer == "none"
    named = bind_tokenizer(DataSpec(source=str(path), tokenizer=str(tok)), ("byte", None), 300)
    assert named.tokenizer == str(tok.resolve())
    assert named.tokenizer_sha256 == curvlab.data.tokenizer_sha256(tok)
    assert named.corpus().tokenizer == "none"  # token ids are used as they are
    # no tokenizer known: text is refused unless the vocabulary is the byte vocabulary
    text = tmp_path / "c.txt"
    text.write_text(TEXT)
    with pytest.raises(DataError, match="vocabulary 50,304"):
        bind_tokenizer(DataSpec(source=str(text)), ("none", None), 50_304)
    assert bind_tokenizer(DataSpec(source=str(text)), ("none", None), 256).tokenizer == "byte"
    with pytest.raises(DataError, match="vocabulary 300"):  # unbound auto, through the API
        BatchStream(DataSpec(source=str(text), seq_len=8)).check_vocab(300)


def test_tokenizer_folder_without_transformers(hf_model, monkeypatch):
    """A folder's tokenizer.json is read with `tokenizers` alone when transformers is missing:
    the same ids and end-of-text token."""
    folder = hf_model["with"]
    with_auto = curvlab.data.HFTokenizer(folder)
    assert with_auto.backend.startswith("transformers")
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    plain = curvlab.data.HFTokenizer(folder)
    assert plain.backend.startswith("tokenizers")
    assert plain.encode(TEXT).tolist() == with_auto.encode(TEXT).tolist() == \
        _ids(hf_model["tok"], TEXT)
    assert plain.eot_id == with_auto.eot_id == hf_model["tok"].token_to_id(EOT)
    assert plain.sha256 == with_auto.sha256
