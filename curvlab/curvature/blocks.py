"""Named partitions of the parameter vector θ into blocks.

θ is the concatenation of the model's unique parameters in ``named_parameters()`` order (tied
weights once), each flattened row-major. A :class:`Partition` maps block names to lists of
:class:`Part` (a parameter name and a flat index range ``[start, stop)`` of it). Blocks are
disjoint; a partition may cover only part of θ.

Presets:

- ``layer``: the layerwise partition of arXiv 2510.09378: ``embed`` (everything before the
  first transformer block), ``layer.N`` (each block ``*.layers.N.*`` / ``*.h.N.*`` /
  ``*.blocks.N.*``), ``head`` (everything after the last block: final norm and LM head).
- ``param``: one block per parameter tensor, named by the parameter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from curvlab.errors import ConfigError

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block)\.(\d+)\.")


@dataclass(frozen=True)
class Part:
    """Elements ``[start, stop)`` of the flattened parameter ``param``."""

    param: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Block:
    """A named set of parameter parts; its coordinates are the parts' elements in order."""

    name: str
    parts: tuple[Part, ...]

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.param for p in self.parts))


@dataclass(frozen=True)
class Partition:
    """An ordered collection of disjoint blocks."""

    blocks: tuple[Block, ...]
    preset: str = "custom"

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def sizes(self) -> list[int]:
        return [b.size for b in self.blocks]

    @property
    def offsets(self) -> list[int]:
        out, total = [], 0
        for b in self.blocks:
            out.append(total)
            total += b.size
        return out

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        return iter(self.blocks)

    def __getitem__(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise ConfigError(f"unknown block {name!r}; valid blocks: {', '.join(self.names)}")

    def select(self, names: Sequence[str]) -> Partition:
        return Partition(tuple(self[n] for n in names), self.preset)


def _whole(name: str, p: nn.Parameter) -> Part:
    return Part(name, 0, p.numel())


def layer_partition(model: nn.Module) -> Partition:
    """Embedding / one block per transformer layer / final norm + head (see module docstring)."""
    named = list(model.named_parameters())
    layer_of = {}
    for name, _ in named:
        m = _LAYER_RE.search(name)
        if m:
            layer_of[name] = int(m.group(1))
    if not layer_of:
        raise ConfigError(
            "layer partition: no repeated transformer blocks found (expected parameter names "
            "like 'layers.N.' or 'h.N.'); use the 'param' preset or globs"
        )
    first = min(i for i, (n, _) in enumerate(named) if n in layer_of)
    groups: dict[str, list[Part]] = {"embed": []}
    for i, (name, p) in enumerate(named):
        if name in layer_of:
            key = f"layer.{layer_of[name]}"
        else:
            key = "embed" if i < first else "head"
        groups.setdefault(key, []).append(_whole(name, p))
    groups.setdefault("head", groups.pop("head", []))
    blocks = tuple(Block(k, tuple(v)) for k, v in groups.items() if v)
    return Partition(blocks, "layer")


def param_partition(model: nn.Module) -> Partition:
    """One block per (unique) parameter tensor."""
    blocks = tuple(Block(n, (_whole(n, p),)) for n, p in model.named_parameters())
    return Partition(blocks, "param")


PRESETS = {"layer": layer_partition, "param": param_partition}


def partition(model: nn.Module, spec: str | Iterable[str] = "layer") -> Partition:
    """Build a partition from a preset name."""
    if isinstance(spec, str) and spec in PRESETS:
        return PRESETS[spec](model)
    raise ConfigError(f"unknown block preset {spec!r}; valid presets: {', '.join(PRESETS)}")
