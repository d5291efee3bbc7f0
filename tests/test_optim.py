"""curvlab.optim.GaussNewton in a user's own loop: equal to curvlab train, any model, resume,
batches as users have them, clear errors that leave the model unchanged. float64, CPU."""

import functools

import pytest
import torch
from torch import nn

import curvlab
from curvlab.curvature.model_fn import default_logits_fn
from curvlab.errors import ConfigError, CurvlabError
from curvlab.optim import GaussNewton, as_batch, mean_loss
from curvlab.train import TrainConfig, TrainingDivergedError, train
from tests.conftest import train_checkpoint

B, T, INNER, STEPS = 2, 16, 2, 3


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    return train_checkpoint(tmp_path_factory.mktemp("optim") / "init.pt", seed=5,
                            seq_len=T, batch_size=B)


def _stream():
    return curvlab.BatchStream(curvlab.DataSpec(seq_len=T, batch_size=B))


@pytest.mark.parametrize("optimizer", ["gn", "gn-prox", "layerwise-gn"])
def test_steps_equal_curvlab_train(init_ckpt, optimizer):
    """The object with its defaults (+ the trainer's cosine schedule) on the trainer's batch
    layout takes the trainer's steps: the defaults agree and there is one implementation."""
    r = train(TrainConfig(optimizer=optimizer, init=init_ckpt, micro_batch_size=B, seq_len=T,
                          dtype="float64", inner_steps=INNER, max_steps=STEPS,
                          eval_every=STEPS, eval_batches=1))
    model, _ = curvlab.load_checkpoint(init_ckpt, dtype=torch.float64)
    model.train()
    opt = GaussNewton(model, mode="prox" if optimizer.endswith("prox") else "gn",
                      blocks="layer" if optimizer.startswith("layerwise") else None,
                      schedule="cosine", total_steps=STEPS)
    stream, K = _stream(), 2 * INNER
    steps = []
    for t in range(STEPS):
        batches = stream.batches(K, t * K)
        steps.append(opt.step(batches[:INNER], batches[INNER:]).step_size)
    assert steps == [row["ls_step"] for row in r.history[1:]]
    for (k, p), q in zip(model.named_parameters(), r.model.parameters()):
        assert (p - q).norm() <= 1e-10 * q.norm(), k


def test_state_dict_resumes_exactly(init_ckpt, tmp_path):
    stream = _stream()
    batches = [stream.batches(4, 4 * t) for t in range(3)]

    def fresh():
        model, _ = curvlab.load_checkpoint(init_ckpt, dtype=torch.float64)
        return model, GaussNewton(model, blocks="layer", inner="adamw")

    whole, opt = fresh()
    for b in batches:
        opt.step(b[:2], b[2:])
    part, opt = fresh()
    opt.step(batches[0][:2], batches[0][2:])
    torch.save({"model": part.state_dict(), "gn": opt.state_dict()}, tmp_path / "ck.pt")
    resumed, opt2 = fresh()  # a new process: model and optimizer from the user's checkpoint
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    resumed.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["gn"])
    for b in batches[1:]:
        opt2.step(b[:2], b[2:])
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def _hf_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=32,
                                   pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).double()


def _hf_batches(count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, 40, (3, 10), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, 7:] = 0  # right padding
        ids = ids.masked_fill(mask == 0, 0)
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": ids.masked_fill(mask == 0, -100)})
    return out


def test_hugging_face_batches_score_the_models_own_loss_and_train():
    model = _hf_llama()
    opt = GaussNewton(model, blocks="layer", inner_lr=0.02)  # switches to math attention
    batches = _hf_batches(6)
    for b in batches[:2]:
        own = float(model(**b).loss.detach())
        batch, mask = as_batch(b)
        ours = mean_loss(model, None, [batch], logits_fns=functools.partial(
            default_logits_fn, attention_mask=mask))
        # transformers computes its loss from logits cast to float32: equal to that precision
        assert ours == pytest.approx(own, rel=1e-6)
        # without labels: padding (attention_mask 0) is ignored as well
        no_labels, _ = as_batch({k: v for k, v in b.items() if k != "labels"})
        assert torch.equal(no_labels.targets, batch.targets)
    before = sum(float(model(**b).loss.detach()) for b in batches) / len(batches)
    for _ in range(3):
        opt.step(batches[:3], batches[3:])
    after = sum(float(model(**b).loss.detach()) for b in batches) / len(batches)
    assert after < before - 1e-3


class Custom(nn.Module):
    """Not a causal LM interface: forward takes a dict and returns a dict."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20)

    def forward(self, features):
        h = torch.tanh(self.mix(self.emb(features["tokens"])).cumsum(1))
        return {"scores": self.head(h)}


def test_custom_module_with_logits_fn_trains():
    torch.manual_seed(0)
    model = Custom().double()

    def logits_fn(m, params, inputs):
        return torch.func.functional_call(m, dict(params), ({"tokens": inputs},))["scores"]

    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 20, (8, 3, 9), generator=gen)
    batches = [(x[:, :-1], x[:, 1:]) for x in tokens]
    opt = GaussNewton(model, logits_fn=logits_fn, inner="sgd", inner_lr=0.5, momentum=0.0)
    start = mean_loss(model, dict(model.named_parameters()), [as_batch(b)[0] for b in batches],
                      logits_fns=logits_fn)
    for _ in range(4):
        r = opt.step(batches[:4], batches[4:])
    end = mean_loss(model, dict(model.named_parameters()), [as_batch(b)[0] for b in batches],
                    logits_fns=logits_fn)
    assert end < start - 0.05 and r.predicted_decrease > 0


def _snapshot(model):
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def _same(a, b):
    return all(torch.equal(a[k].view(torch.int64), b[k].view(torch.int64)) for k in a)


def test_bad_input_is_one_clear_error_and_leaves_the_model_unchanged(init_ckpt):
    model, _ = curvlab.load_checkpoint(init_ckpt, dtype=torch.float64)
    batches = _stream().batches(4)
    opt = GaussNewton(model)
    before = _snapshot(model)
    cases = [
        (lambda: opt.step([], batches), "at least one inner micro-batch"),
        (lambda: opt.step(batches[:2]), "line search needs line_search_batches"),
        (lambda: opt.step(batches[0], batches[2:]), "a list of micro-batches"),
        (lambda: opt.step([curvlab.Batch(batches[0].inputs.to("meta"),
                                         batches[0].targets.to("meta"))], batches[2:]),
         "is on meta"),
        (lambda: opt.step([(batches[0].inputs, torch.full_like(batches[0].targets, -100))],
                          batches[2:]), "no target tokens"),
        (lambda: opt.step([{"labels": batches[0].targets}], batches[2:]), "input_ids"),
        (lambda: opt.step([(batches[0].inputs.double(), batches[0].targets)], batches[2:]),
         "integer tensor"),
    ]
    for fn, match in cases:
        with pytest.raises(CurvlabError, match=match):
            fn()
        assert _same(before, _snapshot(model))
    with pytest.raises(ConfigError, match="no parameter matches 'decoder.*'"):
        GaussNewton(model, blocks=["decoder.*"])
    with pytest.raises(ConfigError, match="whole parameters"):
        GaussNewton(model, blocks=["q=layers.0.self_attn.q_proj.weight[0:2]"])
    with pytest.raises(ConfigError, match="unknown inner optimizer"):
        GaussNewton(model, inner="lbfgs")
    frozen, _ = curvlab.load_checkpoint(init_ckpt, dtype=torch.float64)
    frozen.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        GaussNewton(frozen)
    # a NaN parameter: the step refuses, the model is left as it was, the warm start reset
    with torch.no_grad():
        model.get_parameter("lm_head.weight")[0, 0] = float("nan")
    before = _snapshot(model)
    with pytest.raises(TrainingDivergedError, match="parameters are unchanged"):
        opt.step(batches[:2], batches[2:])
    assert _same(before, _snapshot(model))


def test_frozen_parameters_stay_fixed_and_custom_inner_optimizers_work(init_ckpt):
    model, _ = curvlab.load_checkpoint(init_ckpt, dtype=torch.float64)
    model.get_parameter("embed_tokens.weight").requires_grad_(False)
    before = _snapshot(model)
    opt = GaussNewton(model, inner=lambda ps: torch.optim.SGD(ps, lr=0.1), inner_lr=0.1,
                      line_search=False)
    r = opt.step(_stream().batches(2))
    after = _snapshot(model)
    assert torch.equal(before["embed_tokens.weight"], after["embed_tokens.weight"])
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    assert r.step_size == 1.0 and r.line_search_losses == ()
