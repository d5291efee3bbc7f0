import pytest
import torch

import curvlab
from curvlab.models import ModelConfig, build_model

torch.set_num_threads(1)  # tiny models: threading overhead dominates


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    """Tokenized text goes to a temporary token cache, never the user's ~/.cache/curvlab
    (subprocesses inherit it)."""
    import os

    old = os.environ.get("CURVLAB_CACHE")
    os.environ["CURVLAB_CACHE"] = str(tmp_path_factory.mktemp("curvlab-cache"))
    yield
    if old is None:
        os.environ.pop("CURVLAB_CACHE", None)
    else:
        os.environ["CURVLAB_CACHE"] = old

# Small enough for dense curvature in float64, large enough to have every kind of layer.
LLAMA_TEST = ModelConfig("llama", vocab_size=32, seq_len=8, d_model=8, n_layers=2, n_heads=2,
                         d_ff=12)
# Byte vocabulary (trains on the embedded corpus), still small enough for float64 training tests.
TRAIN_TEST = ModelConfig("llama", vocab_size=256, seq_len=16, d_model=16, n_layers=2, n_heads=2,
                         d_ff=32)
GPT_TEST = ModelConfig("gpt", vocab_size=32, seq_len=8, d_model=8, n_layers=2, n_heads=2,
                       d_ff=16, bias=True, tie_embeddings=True)


def make_model(cfg: ModelConfig, seed: int = 0, dtype=torch.float64):
    model = build_model(cfg, seed=seed).to(dtype)
    # perturb norm weights and biases away from 1 / 0 so that their derivatives are generic
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=dtype))
            else:
                p.mul_(10.0)  # O(1) logits: curvature that is not dominated by the uniform softmax
    return model.eval()


def train_checkpoint(path, seed: int = 0, seq_len: int = 16, batch_size: int = 2) -> str:
    """A float64 TRAIN_TEST model saved as a curvlab checkpoint (the start of training tests)."""
    model = build_model(TRAIN_TEST, seed=seed).double()
    spec = curvlab.DataSpec(seq_len=seq_len, batch_size=batch_size)
    return str(curvlab.save_checkpoint(path, model, data=spec.to_dict()))


def make_batch(cfg: ModelConfig, batch_size: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1), generator=gen)
    return curvlab.Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


@pytest.fixture(params=["llama", "gpt"])
def family(request):
    return request.param


@pytest.fixture
def cfg(family):
    return LLAMA_TEST if family == "llama" else GPT_TEST
