import math

import pytest
import torch
import torch.nn.functional as F

import curvlab
from curvlab.errors import CheckpointError
from curvlab.models import ModelConfig, build_model


def test_round_trip(tmp_path, cfg):
    model = build_model(cfg, seed=3).eval()
    spec = curvlab.DataSpec(seq_len=cfg.seq_len, seed=11)
    path = curvlab.save_checkpoint(
        tmp_path / "c.pt", model, step=42, optimizer={"name": "adamw", "hparams": {"lr": 1e-3}},
        data=spec.to_dict(), metrics={"val_loss": 2.5},
    )
    loaded, info = curvlab.load_checkpoint(path)
    assert not loaded.training
    assert info.kind == "curvlab" and info.step == 42 and info.config == cfg
    assert info.optimizer["hparams"]["lr"] == 1e-3 and info.metrics["val_loss"] == 2.5
    assert curvlab.DataSpec.from_dict(info.data) == spec
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    assert torch.equal(model(x), loaded(x))
    if cfg.tie_embeddings:
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert not list(tmp_path.glob("*.tmp"))


def test_load_dtype_and_device(tmp_path, cfg):
    path = curvlab.save_checkpoint(tmp_path / "c.pt", build_model(cfg))
    model, _ = curvlab.load_checkpoint(path, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())


def _nanogpt_reference(sd, args, idx):
    """nanoGPT's forward written out from the raw state dict (independent of curvlab)."""
    d, nh = args["n_embd"], args["n_head"]
    t = idx.shape[1]
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:t]
    for i in range(args["n_layer"]):
        p = f"transformer.h.{i}."
        h = F.layer_norm(x, (d,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
        qkv = h @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = (z.view(1, t, nh, d // nh).transpose(1, 2) for z in qkv.split(d, 2))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // nh)
        att = att.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(1, t, d)
        x = x + y @ sd[p + "attn.c_proj.weight"].T + sd[p + "attn.c_proj.bias"]
        h = F.layer_norm(x, (d,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
        h = F.gelu(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (d,), sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"], 1e-5)
    return x @ sd["lm_head.weight"].T


def _nanogpt_checkpoint(path, compiled=True):
    args = dict(n_layer=2, n_head=2, n_embd=16, block_size=12, bias=True, vocab_size=40,
                dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    d = 16
    shapes = {"transformer.wte.weight": (40, d), "transformer.wpe.weight": (12, d),
              "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
    for i in range(2):
        p = f"transformer.h.{i}."
        shapes.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
                       p + "attn.c_attn.weight": (3 * d, d), p + "attn.c_attn.bias": (3 * d,),
                       p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                       p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
                       p + "mlp.c_fc.weight": (4 * d, d), p + "mlp.c_fc.bias": (4 * d,),
                       p + "mlp.c_proj.weight": (d, 4 * d), p + "mlp.c_proj.bias": (d,),
                       p + "attn.bias": None})
    sd = {}
    for k, s in shapes.items():
        if s is None:  # nanoGPT's causal mask buffer (non-flash path)
            sd[k] = torch.tril(torch.ones(12, 12)).view(1, 1, 12, 12)
        else:
            sd[k] = 0.3 * torch.randn(s, generator=gen)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied, stored under both names
    prefix = "_orig_mod." if compiled else ""
    ckpt = {"model": {prefix + k: v for k, v in sd.items()}, "optimizer": {}, "model_args": args,
            "iter_num": 250, "best_val_loss": torch.tensor(1.75), "config": {"dataset": "x"}}
    torch.save(ckpt, path)
    return sd, args


@pytest.mark.parametrize("compiled", [True, False])
def test_nanogpt_checkpoint_logits(tmp_path, compiled):
    sd, args = _nanogpt_checkpoint(tmp_path / "ckpt.pt", compiled)
    model, info = curvlab.load_checkpoint(tmp_path / "ckpt.pt")
    assert info.kind == "nanogpt" and info.step == 250
    assert info.metrics["best_val_loss"] == pytest.approx(1.75)
    assert info.config.family == "gpt" and info.config.d_model == 16
    idx = torch.randint(0, 40, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)
    ref = _nanogpt_reference(sd, args, idx)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_bad_checkpoints(tmp_path, cfg):
    with pytest.raises(CheckpointError, match="not found"):
        curvlab.load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        curvlab.load_checkpoint(junk)
    good = curvlab.save_checkpoint(tmp_path / "good.pt", build_model(cfg))
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        curvlab.load_checkpoint(trunc)
    obj = torch.load(good, weights_only=True)
    obj["model"]["config"]["family"] = "mamba"
    torch.save(obj, tmp_path / "fam.pt")
    with pytest.raises(CheckpointError, match="unknown model family 'mamba'"):
        curvlab.load_checkpoint(tmp_path / "fam.pt")
    obj = torch.load(good, weights_only=True)
    obj["model"]["config"]["d_model"] = 2 * cfg.d_model
    obj["model"]["config"]["d_ff"] = cfg.d_ff
    torch.save(obj, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="has shape .* but the model config needs"):
        curvlab.load_checkpoint(tmp_path / "mismatch.pt")
    obj = torch.load(good, weights_only=True)
    obj["model"]["config"]["n_layers"] = cfg.n_layers + 1
    torch.save(obj, tmp_path / "layers.pt")
    with pytest.raises(CheckpointError, match="do not match the model config .*missing"):
        curvlab.load_checkpoint(tmp_path / "layers.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a curvlab or nanoGPT checkpoint"):
        curvlab.load_checkpoint(tmp_path / "other.pt")
    torch.save({"m": torch.nn.Linear(2, 2)}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        curvlab.load_checkpoint(tmp_path / "pickle.pt")


def test_unknown_config_field(tmp_path):
    good = curvlab.save_checkpoint(tmp_path / "good.pt", build_model(ModelConfig()))
    obj = torch.load(good, weights_only=True)
    obj["model"]["config"]["n_experts"] = 8
    torch.save(obj, tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match="unknown field"):
        curvlab.load_checkpoint(tmp_path / "f.pt")
