"""HDF5 results files: layout, round trips, provenance checks on resume, clear errors."""

import hashlib
import json

import h5py
import numpy as np
import pytest
import torch

from curvlab import store
from curvlab.curvature.blocks import Block, Part, Partition
from curvlab.curvature.coupling import CouplingMap
from curvlab.store import StoreError

PARTITION = Partition((
    Block("embed", (Part("embed.weight", 0, 6),)),
    Block("layer.0/attn", (Part("l0.q", 0, 4), Part("l0.k", 2, 5))),
    Block("a%2Fb.c", (Part("head.weight", 0, 3),)),
), "custom")


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"weights v1")
    return path


def provenance(checkpoint, **changes):
    fields = dict(model={"family": "llama", "d_model": 8}, data={"source": "default", "seed": 0},
                  dtype="float64", device="cpu")
    fields.update(changes)
    return store.make_provenance(checkpoint, **fields)


def test_name_encoding_round_trips_and_keeps_dots():
    for name in ["layer.0", "a/b", "%2F", "a%b/c.d", ".", "layers.0.self_attn.q_proj.weight"]:
        key = store.encode_name(name)
        assert "/" not in key and key != "."
        assert store.decode_name(key) == name
    assert store.encode_name("layers.0.mlp") == "layers.0.mlp"
    assert store.encode_name("a/b") == "a%2Fb"


def test_sha256_file(checkpoint):
    assert store.sha256_file(checkpoint) == hashlib.sha256(b"weights v1").hexdigest()
    with pytest.raises(StoreError, match="cannot read"):
        store.sha256_file(checkpoint.parent / "missing.pt")
    folder = checkpoint.parent / "hf"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_bytes(b"{}")
    (folder / "sub" / "w.bin").write_bytes(b"w")
    expected = hashlib.sha256()
    for rel, data in [("config.json", b"{}"), ("sub/w.bin", b"w")]:
        expected.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    assert store.sha256_file(folder) == expected.hexdigest()
    (folder / "sub" / "w.bin").write_bytes(b"v")
    assert store.sha256_file(folder) != expected.hexdigest()


def test_write_then_read_round_trip(tmp_path, checkpoint):
    prov = provenance(checkpoint)
    path = tmp_path / "out" / "r.h5"  # parent folder is created
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 6))
    b = rng.standard_normal((6, 3))
    with store.create_file(path, prov, PARTITION, param_shapes={"embed.weight": (2, 3)}) as w:
        t = w.target("ggn", "layer.0/attn", "embed", "float64", chunk_cols=4)
        assert (t.shape, t.chunk_cols, t.n_chunks) == ((7, 6), 4, 2)
        assert t.columns(1) == (4, 6)
        t.write(0, a[:, :4])
        t.write(1, torch.from_numpy(a[:, 4:]))  # tensors are accepted too
        t2 = w.target("ggn", "embed", "a%2Fb.c", torch.float64, chunk_cols=100)
        assert t2.chunk_cols == 3  # never wider than the block
        t2.write(0, b)
        assert w.find("ggn", "embed", "embed") is None
        with pytest.raises(StoreError, match="holds float64 results"):
            w.target("hessian", "embed", "embed", "float32", 4)
        with pytest.raises(ValueError, match="needs shape"):
            t.write(1, a[:, :4])
    r = store.read(path)
    assert r.partition == PARTITION
    assert r.names == ["embed", "layer.0/attn", "a%2Fb.c"]
    assert r.kinds == ["ggn"]
    assert r.pairs("ggn") == [("embed", "a%2Fb.c"), ("layer.0/attn", "embed")]
    assert torch.equal(r.block("ggn", "layer.0/attn", "embed"), torch.from_numpy(a))
    assert torch.equal(r.block("ggn", "embed", "layer.0/attn"), torch.from_numpy(a).T)
    assert torch.equal(r.block("ggn", "embed", "a%2Fb.c"), torch.from_numpy(b))
    assert all(s.complete for s in r.status())
    # provenance
    for key in ("curvlab_version", "torch_version", "created", "checkpoint", "checkpoint_sha256",
                "model", "data", "loss", "dtype", "device"):
        assert key in r.attrs, key
    assert r.attrs["checkpoint_sha256"] == hashlib.sha256(b"weights v1").hexdigest()
    assert r.attrs["model"] == {"family": "llama", "d_model": 8}
    assert r.attrs["loss"] == "mean token cross-entropy"
    assert r.attrs["torch_version"] == str(torch.__version__)
    assert r.provenance == prov
    # the raw layout that users' own h5py code relies on
    with h5py.File(path, "r") as f:
        ds = f["curvature/ggn/layer.0%2Fattn/embed"]
        assert ds.chunks == (7, 4) and ds.dtype == np.float64
        assert list(ds.attrs["done"]) == [True, True] and ds.attrs["complete"]
        assert (ds.attrs["row"], ds.attrs["col"]) == ("layer.0/attn", "embed")
        assert "a%252Fb.c" in f["curvature/ggn/embed"]
        assert list(f["blocks/names"].asstr()[()]) == PARTITION.names
        assert json.loads(f["blocks/params"].asstr()[1]) == [["l0.q", 0, 4], ["l0.k", 2, 5]]
        assert list(f["blocks/sizes"][()]) == [6, 7, 3]
        assert list(f["blocks/offsets"][()]) == [0, 6, 13]
        assert json.loads(f["blocks"].attrs["param_shapes"]) == {"embed.weight": [2, 3]}
        assert f.attrs["dtype"] == "float64" and json.loads(f.attrs["data"])["seed"] == 0


def test_float32_blocks_and_incomplete_reads(tmp_path, checkpoint):
    path = tmp_path / "r.h5"
    with store.create_file(path, provenance(checkpoint, dtype=torch.float32), PARTITION) as w:
        t = w.target("hessian", "embed", "embed", torch.float32, chunk_cols=4)
        t.write(1, np.ones((6, 2), dtype=np.float32))
        assert list(t.done) == [False, True] and not t.complete
    r = store.read(path)
    (status,) = r.status()
    assert (status.chunks_done, status.chunks, status.complete) == (1, 2, False)
    with pytest.raises(StoreError, match=r"incomplete \(1 of 2 column chunks"):
        r.block("hessian", "embed", "embed")
    part = r.block("hessian", "embed", "embed", allow_incomplete=True)
    assert part.dtype == torch.float32
    assert torch.isnan(part[:, :4]).all() and (part[:, 4:] == 1).all()
    with pytest.raises(StoreError, match="does not hold hessian block"):
        r.block("hessian", "embed", "layer.0/attn")
    with pytest.raises(StoreError, match="unknown block 'nope'"):
        r.block("hessian", "nope", "embed")
    with pytest.raises(StoreError, match="no ggn blocks"):
        r.pairs("ggn")


def test_resume_keeps_done_chunks(tmp_path, checkpoint):
    path = tmp_path / "r.h5"
    prov = provenance(checkpoint)
    with store.create_file(path, prov, PARTITION) as w:
        w.target("ggn", "embed", "embed", "float64", 2).write(1, np.full((6, 2), 7.0))
    with store.open_for_resume(path, provenance(checkpoint, device="cuda"), PARTITION) as w:
        assert w.provenance.created == prov.created  # the file's provenance is kept
        t = w.target("ggn", "embed", "embed", "float64", chunk_cols=5)  # the file's width wins
        assert t.chunk_cols == 2 and list(t.done) == [False, True, False]


@pytest.mark.parametrize("change, message", [
    ({"dtype": "float32"}, "dtype differs (file float64, now float32)"),
    ({"model": {"family": "llama", "d_model": 16}}, "model.d_model differs (file 8, now 16)"),
    ({"data": {"source": "default", "seed": 1}}, "data.seed differs (file 0, now 1)"),
])
def test_resume_refuses_other_computation(tmp_path, checkpoint, change, message):
    path = tmp_path / "r.h5"
    store.create_file(path, provenance(checkpoint), PARTITION).close()
    with pytest.raises(StoreError, match="cannot resume") as err:
        store.open_for_resume(path, provenance(checkpoint, **change), PARTITION)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_resume_refuses_other_checkpoint_and_blocks(tmp_path, checkpoint):
    path = tmp_path / "r.h5"
    store.create_file(path, provenance(checkpoint), PARTITION).close()
    other = tmp_path / "other.pt"
    other.write_bytes(b"weights v2")
    with pytest.raises(StoreError, match="cannot resume .*checkpoint_sha256 differs"):
        store.open_for_resume(path, provenance(other), PARTITION)
    fewer = Partition(PARTITION.blocks[:2])
    with pytest.raises(StoreError, match="cannot resume .*blocks differ"):
        store.open_for_resume(path, provenance(checkpoint), fewer)
    moved = Partition((PARTITION.blocks[0], Block("layer.0/attn", (Part("l0.q", 0, 5),)),
                       PARTITION.blocks[2]))
    with pytest.raises(StoreError, match="block 'layer.0/attn' covers different"):
        store.open_for_resume(path, provenance(checkpoint), moved)
    # the refused file is closed again: it can be resumed with the right inputs
    store.open_for_resume(path, provenance(checkpoint), PARTITION).close()


def test_kind_options_must_match_on_resume(tmp_path, checkpoint):
    path = tmp_path / "r.h5"
    with store.create_file(path, provenance(checkpoint), PARTITION) as w:
        w.kind_options("mcfisher", {"mc_samples": 1, "seed": 0})
    with store.open_for_resume(path, provenance(checkpoint), PARTITION) as w:
        w.kind_options("mcfisher", {"mc_samples": 1, "seed": 0})
        with pytest.raises(StoreError, match="mcfisher options differ"):
            w.kind_options("mcfisher", {"mc_samples": 1, "seed": 3})


def test_unreadable_files_give_clear_errors(tmp_path, checkpoint):
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x00\x01not hdf5 at all" * 100)
    for call, what in [(lambda p: store.open_for_resume(p, provenance(checkpoint), PARTITION),
                        "resume"), (store.read, "read")]:
        with pytest.raises(StoreError, match=f"cannot {what} .*garbage.h5: not a readable HDF5"):
            call(garbage)
        with pytest.raises(StoreError, match=f"cannot {what} .*: no such file"):
            call(tmp_path / "missing.h5")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(StoreError, match="not a curvlab results file"):
        store.read(other)
    with pytest.raises(StoreError, match="not a curvlab results file"):
        store.open_for_resume(other, provenance(checkpoint), PARTITION)


def test_unwritable_outputs_give_clear_errors(tmp_path, checkpoint):
    prov = provenance(checkpoint)
    with pytest.raises(StoreError, match="cannot write .*model.pt is not a folder"):
        store.create_file(checkpoint / "r.h5", prov, PARTITION)  # parent is a file
    with pytest.raises(StoreError, match="cannot write .*it is a folder"):
        store.create_file(tmp_path, prov, PARTITION)
    path = tmp_path / "r.h5"
    store.create_file(path, prov, PARTITION).close()
    with pytest.raises(StoreError, match="exists; pass --overwrite or choose another"):
        store.create_file(path, prov, PARTITION)
    store.create_file(path, prov, PARTITION, overwrite=True).close()
    assert not list(tmp_path.glob(".*.tmp"))


def test_coupling_round_trip(tmp_path, checkpoint):
    cmap = CouplingMap(("embed", "layer.0/attn", "a%2Fb.c"),
                       torch.tensor([[3.0, 1, 0], [1, 2, 0.5], [0, 0.5, 1]]),
                       torch.tensor([[0.0, 0, 0], [0, 0.1, 0], [0, 0, 0]]),
                       torch.tensor([[True, True, True], [True, False, True],
                                     [True, True, True]]),
                       kind="ggn", probes=16, seed=3, exact_max=4)
    path = tmp_path / "r.h5"
    with store.create_file(path, provenance(checkpoint), PARTITION) as w:
        assert not w.has_coupling("ggn")
        w.write_coupling("ggn", cmap)
        w.write_coupling("ggn", cmap)  # replaces
        assert w.has_coupling("ggn")
    back = store.read(path).coupling("ggn")
    assert back.names == cmap.names and (back.probes, back.seed, back.exact_max) == (16, 3, 4)
    for field in ("frobenius", "stderr", "exact"):
        assert torch.equal(getattr(back, field), getattr(cmap, field).to(getattr(back, field)))
    assert back.off_diagonal_energy() == pytest.approx(cmap.off_diagonal_energy(), rel=1e-15)
    with pytest.raises(StoreError, match="no hessian coupling map"):
        store.read(path).coupling("hessian")
