"""Gauss-Newton in your own training loop: :class:`GaussNewton` for any causal LM.

```python
import curvlab

opt = curvlab.optim.GaussNewton(model, blocks=None)         # "layer": layerwise GN
for t in range(steps):
    inner = [next(loader) for _ in range(16)]               # the inner solve's micro-batches
    fresh = [next(loader) for _ in range(16)]               # the line search's
    r = opt.step(inner, fresh)                              # updates model's parameters
    print(t, r.loss, r.step_size)
torch.save({"model": model.state_dict(), "gn": opt.state_dict()}, "ckpt.pt")
```

Micro-batches may be :class:`curvlab.Batch`, ``(inputs, targets)`` pairs of already-shifted
token tensors, or Hugging Face style dicts with ``input_ids`` and optional ``labels`` /
``attention_mask`` (see :func:`as_batch` for the shifting). The same class runs ``curvlab
train``'s GN methods (one implementation); the algorithm, its reference in the paper's code and
the normalization are in :mod:`curvlab.train.gauss_newton`; a guide with runnable nanoGPT-style
and Hugging Face loops is docs/optim.md.
"""

from curvlab.train.gauss_newton import GaussNewton, GNStep, as_batch, mean_loss

__all__ = ["GNStep", "GaussNewton", "as_batch", "mean_loss"]
