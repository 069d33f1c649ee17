"""What a UNet is conditioned on: class labels and/or text embeddings, batched like the images they go with."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class Condition:
    """UNet conditioning for one batch. Every field is None or a tensor whose first dimension is the batch."""

    class_labels: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None

    def _map(self, fn) -> Condition:
        return Condition(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                            for f in fields(self)})

    def to(self, device: torch.device | str) -> Condition:
        return self._map(lambda v: v.to(device))

    def __getitem__(self, index) -> Condition:
        return self._map(lambda v: v[index])

    def repeat(self, times: int) -> Condition:
        return self._map(lambda v: v.repeat(times, *([1] * (v.dim() - 1))))

    @staticmethod
    def cat(conditions: list[Condition]) -> Condition:
        first = conditions[0]
        return Condition(**{f.name: None if getattr(first, f.name) is None
                            else torch.cat([getattr(c, f.name) for c in conditions])
                            for f in fields(first)})

    def unet_kwargs(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
