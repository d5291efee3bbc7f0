"""The exact GN step (inner solver ``cg``) and the cost counters of every GN step, in float64.

Oracles: a dense GGN built here (``torch.func.jacrev`` of the logits, the logit Hessian of the
mean cross-entropy written out, ``Jᵀ H J`` explicitly) and the gradient by plain autograd;
forward passes counted by wrapping the model's ``forward``.
"""

import pytest
import torch

from curvlab.optim import GaussNewton
from curvlab.train.gn import PASS_KINDS
from tests.conftest import LLAMA_TEST, make_batch, make_model


def _batches(count, seed, ignore=0):
    """``count`` micro-batches of 2 x 8 tokens; the first ``ignore`` targets of each ignored
    (so the token counts differ between micro-batches when ``ignore`` varies)."""
    out = []
    for k in range(count):
        b = make_batch(LLAMA_TEST, batch_size=2, seed=seed + k)
        if ignore:
            b.targets[0, : ignore + k] = -100
        out.append(b)
    return out


class _ForwardCounter:
    """Counts the model's forward calls, split by grad mode (the line search runs without)."""

    def __init__(self, model):
        self.grad = self.no_grad = 0
        forward = model.forward

        def counted(*args, **kwargs):
            if torch.is_grad_enabled():
                self.grad += 1
            else:
                self.no_grad += 1
            return forward(*args, **kwargs)

        model.forward = counted


@pytest.mark.parametrize("mode,blocks", [("gn", None), ("gn", "layer"), ("prox", None)])
def test_cost_counters_of_first_order_inner_solvers(mode, blocks):
    model = make_model(LLAMA_TEST)
    opt = GaussNewton(model, mode=mode, blocks=blocks, inner="adamw", line_search_range=3)
    inner, scored = _batches(3, 0, ignore=1), _batches(2, 10, ignore=2)
    counter = _ForwardCounter(model)
    r = opt.step(inner, scored)
    n_blocks = len(opt.blocks)
    assert set(r.passes) == set(PASS_KINDS)
    assert r.passes["inner_gradient"] == n_blocks * 3
    assert r.passes["loss"] == 3 * 2
    assert r.passes["gradient"] == r.passes["linearization"] == r.passes["ggn_product"] == 0
    # what actually ran: one forward (carrying the tangent, under the VJP) per inner gradient,
    # one forward without gradients per scored micro-batch and candidate
    assert counter.grad == r.passes["inner_gradient"]
    assert counter.no_grad == r.passes["loss"]
    tokens = [int((b.targets != -100).sum()) for b in inner + scored]
    assert tokens[0] != tokens[1]  # the counts below are of real token counts
    assert r.tokens_solve == sum(tokens[:3])
    assert r.tokens_line_search == sum(tokens[3:])  # once per micro-batch, as the fork
    assert r.cg_iterations is None and r.cg_residual is None and r.cg_converged is None


def test_cost_counters_without_line_search():
    model = make_model(LLAMA_TEST)
    opt = GaussNewton(model, inner="sgd", line_search=False)
    counter = _ForwardCounter(model)
    r = opt.step(_batches(2, 0))
    assert r.passes["loss"] == 0 and r.tokens_line_search == 0
    assert r.passes["inner_gradient"] == counter.grad == 2 and counter.no_grad == 0
    assert r.tokens_solve == 2 * 2 * 8
