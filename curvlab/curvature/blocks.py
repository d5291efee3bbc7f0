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
- ``qkv``: ``layer.N.q|k|v``, the attention input projections (fused ``c_attn`` split by rows).
- ``heads``: ``layer.N.q|k|v.head.H``, one block per attention head and projection.
- globs and slices: see :func:`partition`.
"""

from __future__ import annotations

import fnmatch
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

    def __post_init__(self) -> None:
        names = [b.name for b in self.blocks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"duplicate block names: {', '.join(dup)}")
        used: dict[str, list[tuple[int, int, str]]] = {}
        for b in self.blocks:
            for part in b.parts:
                for a, c, other in used.get(part.param, []):
                    if part.start < c and a < part.stop:
                        raise ConfigError(
                            f"blocks {other!r} and {b.name!r} overlap in {part.param}")
                used.setdefault(part.param, []).append((part.start, part.stop, b.name))

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


def _attention_qkv(model: nn.Module) -> list[tuple[str, int, dict[str, list[Part]]]]:
    """For each attention module: (layer key, number of heads, {q|k|v: parts}).

    Recognizes separate ``q_proj``/``k_proj``/``v_proj`` (LLaMA, Hugging Face) and a fused
    ``c_attn`` whose output rows are ``[q; k; v]`` (GPT-2, nanoGPT). Rows of a weight
    ``[d_out, d_in]`` are contiguous in the flattened parameter, so a Q/K/V or head slice is a
    flat range.
    """
    params = dict(model.named_parameters())
    found = []
    for mname, module in model.named_modules():
        heads = getattr(module, "n_heads", None) or getattr(module, "num_heads", None)
        prefix = f"{mname}." if mname else ""
        m = _LAYER_RE.search(prefix)
        key = f"layer.{m.group(1)}" if m else (mname or "attn")
        groups: dict[str, list[Part]] = {}
        if all(hasattr(module, f"{x}_proj") for x in "qkv"):
            for x in "qkv":
                for suffix in ("weight", "bias"):
                    name = f"{prefix}{x}_proj.{suffix}"
                    if name in params:
                        groups.setdefault(x, []).append(_whole(name, params[name]))
        elif hasattr(module, "c_attn"):
            for suffix in ("weight", "bias"):
                name = f"{prefix}c_attn.{suffix}"
                if name not in params:
                    continue
                p = params[name]
                rows = p.shape[0] // 3
                per_row = p.numel() // p.shape[0]
                for i, x in enumerate("qkv"):
                    groups.setdefault(x, []).append(
                        Part(name, i * rows * per_row, (i + 1) * rows * per_row)
                    )
        if groups:
            if not heads:
                raise ConfigError(f"attention module {mname!r} does not say its number of heads")
            found.append((key, int(heads), groups))
    if not found:
        raise ConfigError("no attention modules with q/k/v or c_attn projections found")
    return found


def _split_rows(part: Part, heads: int) -> list[Part]:
    """Split a Q/K/V row range into ``heads`` equal consecutive row ranges."""
    size = part.size // heads
    return [Part(part.param, part.start + h * size, part.start + (h + 1) * size)
            for h in range(heads)]


def qkv_partition(model: nn.Module) -> Partition:
    """Blocks ``layer.N.q``, ``layer.N.k``, ``layer.N.v``: each attention projection (weight and
    bias). Covers only the attention input projections."""
    blocks = []
    for key, _, groups in _attention_qkv(model):
        blocks += [Block(f"{key}.{x}", tuple(parts)) for x, parts in groups.items()]
    return Partition(tuple(blocks), "qkv")


def head_partition(model: nn.Module) -> Partition:
    """Blocks ``layer.N.{q,k,v}.head.H``: the rows of one head in each projection."""
    blocks = []
    for key, heads, groups in _attention_qkv(model):
        for x, parts in groups.items():
            per_head: list[list[Part]] = [[] for _ in range(heads)]
            for part in parts:
                for h, piece in enumerate(_split_rows(part, heads)):
                    per_head[h].append(piece)
            blocks += [Block(f"{key}.{x}.head.{h}", tuple(ps)) for h, ps in enumerate(per_head)]
    return Partition(tuple(blocks), "heads")


PRESETS = {
    "layer": layer_partition,
    "param": param_partition,
    "qkv": qkv_partition,
    "heads": head_partition,
}
_SLICE_RE = re.compile(r"^(?P<param>[^\[\]]+)\[(?P<a>\d*):(?P<b>\d*)\]$")


def _spec_block(model: nn.Module, spec: str) -> Block:
    """One block from ``[name=]GLOB`` (all matching parameters) or ``[name=]PARAM[a:b]``
    (rows a..b of one parameter along its first dimension)."""
    name, _, pattern = spec.rpartition("=")
    params = dict(model.named_parameters())
    m = _SLICE_RE.match(pattern)
    if m:
        pname = m.group("param")
        if pname not in params:
            raise ConfigError(f"unknown parameter {pname!r}; valid parameters: "
                              f"{', '.join(params)}")
        p = params[pname]
        rows = p.shape[0]
        a = int(m.group("a") or 0)
        b = int(m.group("b") or rows)
        if not 0 <= a < b <= rows:
            raise ConfigError(f"slice [{a}:{b}] is outside the {rows} rows of {pname}")
        per_row = p.numel() // rows
        return Block(name or pattern, (Part(pname, a * per_row, b * per_row),))
    matched = [n for n in params if fnmatch.fnmatchcase(n, pattern)]
    if not matched:
        raise ConfigError(f"no parameter matches {pattern!r}; valid parameters: "
                          f"{', '.join(params)}")
    return Block(name or pattern, tuple(_whole(n, params[n]) for n in matched))


def partition(model: nn.Module, spec: str | Iterable[str] = "layer") -> Partition:
    """Build a partition.

    ``spec`` is a preset name (``layer``, ``param``, ``qkv``, ``heads``) or a list of block
    specifications, each ``[name=]GLOB`` (one block of all parameters matching the glob, e.g.
    ``attn0=layers.0.self_attn.*``) or ``[name=]PARAM[a:b]`` (rows a..b of one parameter).
    Blocks must be disjoint.
    """
    if isinstance(spec, str):
        if spec in PRESETS:
            return PRESETS[spec](model)
        if "*" not in spec and "?" not in spec and "[" not in spec and "=" not in spec and \
                spec not in dict(model.named_parameters()):
            raise ConfigError(f"unknown block preset {spec!r}; valid presets: "
                              f"{', '.join(PRESETS)}, or parameter globs / slices")
        spec = [spec]
    blocks = tuple(_spec_block(model, s) for s in spec)
    return Partition(blocks, "custom")
