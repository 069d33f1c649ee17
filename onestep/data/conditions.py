"""Where generator batches get their conditions, and GAN/regression batches their real images."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from onestep.conditioning import Condition


class ConditionSampler:
    """Random conditions for a batch: uniform labels over `classes`, uniform prompts from a list, or none.

    `classes` restricts labels to a subset (MSD gives each student its slice); prompts become Conditions through
    `encode` (the teacher's `encode_prompts`: text embeddings, and SDXL's pooled embeddings and time ids).
    """

    def __init__(self, classes: Sequence[int] | None = None, prompts: Sequence[str] | None = None,
                 encode: Callable[[list[str]], Condition] | None = None):
        if prompts is not None and encode is None:
            raise ValueError("prompts need an encode function (the teacher's text encoder)")
        self.classes = torch.as_tensor(list(classes)) if classes is not None else None
        self.prompts, self.encode = (list(prompts) if prompts is not None else None), encode

    def __len__(self) -> int:
        """How many distinct conditions there are (0 for an unconditional model)."""
        if self.prompts is not None:
            return len(self.prompts)
        return len(self.classes) if self.classes is not None else 0

    def draw(self, n: int) -> torch.Tensor:
        """Uniform indices into the condition list (zeros for an unconditional model)."""
        return torch.randint(0, max(len(self), 1), (n,))

    def condition(self, index: torch.Tensor, device: torch.device | str) -> Condition:
        """The Condition of drawn indices (labels, or embedded prompts)."""
        if self.prompts is not None:
            return self.encode([self.prompts[i] for i in index.tolist()]).to(device)
        if self.classes is not None:
            return Condition(class_labels=self.classes[index.cpu()].to(device))
        return Condition()

    def __call__(self, n: int, device: torch.device | str) -> Condition:
        return self.condition(self.draw(n), device)


class RealImages:
    """Real training images held in memory (the embedded digits), with their labels, sampled uniformly; returned in
    model space (VAE latents for latent teachers). Datasets stream instead: onestep.data.streaming.

    Images without labels get `unlabeled(n)` as their condition (the teacher's null class or empty prompt).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                 encode: Callable[[torch.Tensor], torch.Tensor] | None = None, classes: Sequence[int] | None = None,
                 unlabeled: Callable[[int], Condition] | None = None):
        if labels is not None and classes is not None:
            keep = torch.isin(labels, torch.as_tensor(list(classes)))
            images, labels = images[keep], labels[keep]
        if images.shape[0] == 0:
            raise ValueError("no real images left for these classes")
        self.images, self.labels, self.encode, self.unlabeled = images, labels, encode, unlabeled

    @property
    def conditioned(self) -> bool:
        """Whether each image carries its own condition (a label)."""
        return self.labels is not None

    def subset(self, classes: Sequence[int] | None = None, prompts: Sequence[str] | None = None) -> RealImages:
        """Only the images of `classes` (MSD's GAN sees real images of the student's own slice); unlabeled images
        (and a prompt slice: these images have no captions) stay as they are."""
        if classes is None or self.labels is None:
            return self
        return RealImages(self.images, self.labels, self.encode, classes, self.unlabeled)

    def sample(self, n: int, device: torch.device | str) -> tuple[torch.Tensor, Condition]:
        idx = torch.randint(0, self.images.shape[0], (n,))
        x = self.images[idx].to(device)
        x = self.encode(x) if self.encode is not None else x
        if self.labels is not None:
            return x.float(), Condition(class_labels=self.labels[idx].to(device))
        return x.float(), (self.unlabeled(n).to(device) if self.unlabeled is not None else Condition())
