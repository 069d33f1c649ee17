"""Where generator batches get their conditions, and GAN/regression batches their real images."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from onestep.models.conditioning import Condition


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
    """Real training images held in memory (the embedded digits sets), with their labels or captions, sampled
    uniformly; returned in model space (VAE latents for latent teachers). Datasets stream instead:
    onestep.data.streaming.

    Captions become Conditions through `caption_condition` (the teacher's prompt encoding); images with neither
    labels nor captions get `unlabeled(n)` as their condition (the teacher's null class or empty prompt).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                 encode: Callable[[torch.Tensor], torch.Tensor] | None = None, classes: Sequence[int] | None = None,
                 unlabeled: Callable[[int], Condition] | None = None, captions: Sequence[str] | None = None,
                 caption_condition: Callable[[list[str]], Condition] | None = None):
        if captions is not None and caption_condition is None:
            raise ValueError("captions need a caption_condition (the teacher's prompt encoding)")
        if labels is not None and classes is not None:
            keep = torch.isin(labels, torch.as_tensor(list(classes)))
            images, labels = images[keep], labels[keep]
        if images.shape[0] == 0:
            raise ValueError("no real images left for these classes")
        self.images, self.labels, self.encode, self.unlabeled = images, labels, encode, unlabeled
        self.captions, self.caption_condition = (list(captions) if captions is not None else None), caption_condition

    @property
    def conditioned(self) -> bool:
        """Whether each image carries its own condition (a label or a caption)."""
        return self.labels is not None or self.captions is not None

    def subset(self, classes: Sequence[int] | None = None, prompts: Sequence[str] | None = None) -> RealImages:
        """Only the images of `classes`, or whose captions are among `prompts` (MSD's GAN sees real images of the
        student's own slice); images without labels or captions stay as they are."""
        if classes is not None and self.labels is not None:
            return RealImages(self.images, self.labels, self.encode, classes, self.unlabeled)
        if prompts is not None and self.captions is not None:
            own = set(prompts)
            keep = [i for i, caption in enumerate(self.captions) if caption in own]
            return RealImages(self.images[keep], None, self.encode, None, self.unlabeled,
                              [self.captions[i] for i in keep], self.caption_condition)
        return self

    def sample(self, n: int, device: torch.device | str) -> tuple[torch.Tensor, Condition]:
        idx = torch.randint(0, self.images.shape[0], (n,))
        x = self.images[idx].to(device)
        x = (self.encode(x) if self.encode is not None else x).float().contiguous()
        if self.labels is not None:
            return x, Condition(class_labels=self.labels[idx].to(device))
        if self.captions is not None:
            return x, self.caption_condition([self.captions[i] for i in idx.tolist()]).to(device)
        return x, (self.unlabeled(n).to(device) if self.unlabeled is not None else Condition())
