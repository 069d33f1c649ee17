"""Train the shipped digits classifier (the FD-digits feature net) on the first half of `split_halves(seed=0)`.

    python scripts/train_classifier.py --out onestep/assets/digits_classifier --seed 0 --steps 1500

Reports accuracy on the held-out second half and the FD-digits real-vs-real floor, and writes both, with the
command, into OUT/README.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from onestep.data.augment import shift
from onestep.data.digits import load_digits_tensors, split_halves
from onestep.eval.classifier import DEFAULT_CLASSIFIER_DIR, DigitsClassifier
from onestep.eval.fd import real_vs_real_floor


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (model(images).argmax(1) == labels).float().mean().item()


def train(images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int, batch_size: int = 64,
          lr: float = 2e-3) -> DigitsClassifier:
    """AdamW with cosine decay on ±1-pixel shifted batches; deterministic given `seed`."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(shift(images[idx], generator)), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_CLASSIFIER_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # a tiny net: one thread is fastest and keeps the result independent of the core count
    start = time.perf_counter()
    images, labels = load_digits_tensors()
    first, second = split_halves(labels.numpy(), seed=0)
    model = train(images[first], labels[first], args.steps, args.seed)
    train_acc = accuracy(model, images[first], labels[first])
    held_out = accuracy(model, images[second], labels[second])
    seconds = time.perf_counter() - start
    floor = real_vs_real_floor(seed=0, classifier=model).value
    print(f"train accuracy {train_acc:.4f} ({len(first)} images), held-out accuracy {held_out:.4f} "
          f"({len(second)} images), {seconds:.1f} s; FD-digits real-vs-real floor {floor:.3f}")

    model.save_pretrained(args.out, safe_serialization=True)
    command = shlex.join(["python", "scripts/train_classifier.py", *(argv if argv is not None else sys.argv[1:])])
    (args.out / "README.md").write_text(
        "# digits classifier (FD-digits feature net)\n\n"
        "A small CNN on scikit-learn's 8x8 digits (inputs in [-1, 1]); its 64-d penultimate activations are the "
        "features of FD-digits (a Fréchet distance, not Inception FID).\n\n"
        f"- trained on the first half of `split_halves(labels, seed=0)` ({len(first)} images), "
        f"{args.steps} steps, seed {args.seed}, ±1-pixel shift augmentation\n"
        f"- held-out accuracy (second half, {len(second)} images): **{held_out:.2%}**\n"
        f"- train accuracy: {train_acc:.2%}\n"
        f"- FD-digits between the two halves (the real-vs-real floor, `real_vs_real_floor(seed=0)`): {floor:.3f}\n"
        f"- command: `{command}`\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
