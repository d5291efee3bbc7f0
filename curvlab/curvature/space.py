"""Coordinates of a block partition: vectors <-> per-parameter tangents.

A :class:`BlockSpace` is the coordinate system of a :class:`~curvlab.curvature.blocks.Partition`:
a vector of length ``partition.size`` whose entries are the blocks' elements, block after block,
and inside a block its parts in order (each part a flat range of one parameter, row-major).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from curvlab.curvature.blocks import Partition
from curvlab.errors import ConfigError


class BlockSpace:
    """Maps partition coordinates to tangent dictionaries over ``param_names`` and back."""

    def __init__(self, partition: Partition, shapes: Mapping[str, torch.Size]) -> None:
        self.partition = partition
        self.shapes = dict(shapes)
        self.segments: list[tuple[str, int, int, int]] = []  # (param, start, stop, offset)
        offset = 0
        for block in partition:
            for part in block.parts:
                if part.param not in self.shapes:
                    raise ConfigError(f"block {block.name!r}: unknown parameter {part.param!r}")
                numel = self.shapes[part.param].numel()
                if not 0 <= part.start < part.stop <= numel:
                    raise ConfigError(
                        f"block {block.name!r}: range [{part.start}, {part.stop}) is outside "
                        f"parameter {part.param} of {numel} elements"
                    )
                self.segments.append((part.param, part.start, part.stop, offset))
                offset += part.stop - part.start
        self.size = offset
        self.params = list(dict.fromkeys(s[0] for s in self.segments))

    def whole_params(self) -> bool:
        """True if every parameter of the space is covered entirely, by one part."""
        counts: dict[str, int] = {}
        for name, start, stop, _ in self.segments:
            counts[name] = counts.get(name, 0) + 1
            if start != 0 or stop != self.shapes[name].numel():
                return False
        return all(c == 1 for c in counts.values())

    def to_tangents(
        self, v: torch.Tensor, names: list[str], like: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Embed ``v`` [size] into tangents for ``names`` (zero outside the space).

        Written with slicing and concatenation only, so that it works under ``vmap``.
        """
        pieces: dict[str, list[tuple[int, int, torch.Tensor]]] = {}
        for name, start, stop, off in self.segments:
            pieces.setdefault(name, []).append((start, stop, v[off:off + stop - start]))
        out = {}
        for name in names:
            ref = like[name]
            if name not in pieces:
                out[name] = torch.zeros_like(ref)
                continue
            numel, pos, chunks = ref.numel(), 0, []
            for start, stop, values in sorted(pieces[name], key=lambda x: x[0]):
                if start > pos:
                    chunks.append(v.new_zeros(start - pos))
                chunks.append(values)
                pos = stop
            if pos < numel:
                chunks.append(v.new_zeros(numel - pos))
            flat = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
            out[name] = flat.view(ref.shape)
        return out

    def from_tangents(self, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Gather the space's coordinates from per-parameter tensors."""
        parts = [t[name].reshape(-1)[start:stop] for name, start, stop, _ in self.segments]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def flatten_dict(self, d: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A per-parameter dict (whole parameters of this space) as a coordinate vector."""
        if not self.whole_params():
            raise ConfigError(
                "per-parameter dict input needs blocks made of whole parameters; pass a flat vector"
            )
        missing = [n for n in self.params if n not in d]
        extra = [n for n in d if n not in self.params]
        if missing or extra:
            raise ConfigError(
                f"dict input must have exactly the parameters {self.params}; "
                f"missing {missing}, unexpected {extra}"
            )
        for n in self.params:
            if tuple(d[n].shape) != tuple(self.shapes[n]):
                raise ConfigError(f"dict input: {n} has shape {tuple(d[n].shape)}, "
                                  f"expected {tuple(self.shapes[n])}")
        return self.from_tangents(d)

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """A coordinate vector of whole parameters as a per-parameter dict."""
        return {
            name: v[off:off + stop - start].view(self.shapes[name])
            for name, start, stop, off in self.segments
        }
