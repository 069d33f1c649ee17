"""What a denoiser is conditioned on: class labels, text embeddings, SDXL's added conditions, and a flow transformer's
pooled embeddings, FLUX's text ids and embedded guidance, batched like the images they go with."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


# SDXL's extra conditions: the UNet takes them as `added_cond_kwargs` (its "text_time" addition embedding)
ADDED_CONDITIONS = ("text_embeds", "time_ids")


@dataclass(frozen=True)
class Condition:
    """UNet conditioning for one batch. Every field is None or a tensor whose first dimension is the batch.

    `class_labels` (N,) class indices; `encoder_hidden_states` (N, L, D) text embeddings for cross-attention;
    SDXL adds `text_embeds` (N, D') the pooled embedding of its second text encoder and `time_ids` (N, 6) the
    (original height, width, crop top, left, target height, width) of the training images.

    Flow transformers (SD3, FLUX) take `encoder_hidden_states` and the pooled embedding `text_embeds` (their
    `pooled_projections`); FLUX adds `txt_ids` (N, L, 3), its text position ids (one row per sample here; the
    transformer takes one (L, 3)), and FLUX.1-dev `guidance` (N,), the embedded guidance scale.
    """

    class_labels: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    txt_ids: torch.Tensor | None = None
    guidance: torch.Tensor | None = None

    def _map(self, fn) -> Condition:
        return Condition(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                            for f in fields(self)})

    def to(self, device: torch.device | str) -> Condition:
        return self._map(lambda v: v.to(device))

    def __getitem__(self, index) -> Condition:
        return self._map(lambda v: v[index])

    def repeat(self, times: int) -> Condition:
        return self._map(lambda v: v.repeat(times, *([1] * (v.dim() - 1))))

    def expand(self, n: int) -> Condition:
        """A batch-1 condition broadcast to n (a view: the null condition of a batch)."""
        return self._map(lambda v: v.expand(n, *v.shape[1:]))

    @property
    def is_empty(self) -> bool:
        """No class and no text: an unconditional model's condition (nothing to guide with)."""
        return self.class_labels is None and self.encoder_hidden_states is None

    @staticmethod
    def cat(conditions: list[Condition]) -> Condition:
        first = conditions[0]
        return Condition(**{f.name: None if getattr(first, f.name) is None
                            else torch.cat([getattr(c, f.name) for c in conditions])
                            for f in fields(first)})

    def unet_kwargs(self, dtype: torch.dtype | None = None) -> dict:
        """Keywords of a diffusers UNet call, floating tensors cast to `dtype` (the UNet's): SDXL's added
        conditions go in `added_cond_kwargs`."""
        def cast(v: torch.Tensor) -> torch.Tensor:
            return v.to(dtype) if dtype is not None and v.is_floating_point() else v

        present = {f.name: cast(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}
        added = {name: present.pop(name) for name in ADDED_CONDITIONS if name in present}
        return {**present, "added_cond_kwargs": added} if added else present

    def flow_kwargs(self) -> dict:
        """Keywords of `flow_transformer_call` (SD3 / FLUX transformers): text states, pooled embedding, FLUX's ids
        and embedded guidance."""
        if self.encoder_hidden_states is None or self.text_embeds is None:
            raise ValueError("a flow transformer needs prompt embeddings and pooled embeddings")
        return {"encoder_hidden_states": self.encoder_hidden_states, "pooled_projections": self.text_embeds,
                "txt_ids": self.txt_ids, "guidance": self.guidance}
