"""Train a shipped digits judge (a classifier whose penultimate layer is a Fréchet-distance feature net).

    python scripts/train_classifier.py --out onestep/assets/digits_classifier --seed 0 --steps 1500
    python scripts/train_classifier.py --out onestep/assets/digits_mlp_classifier --architecture mlp \
        --split-seed 1 --seed 1 --steps 3000 --noise-std 0.1 --label-smoothing 0.1 --dropout 0.1

The first is FD-digits' CNN; the second, FD-digits_mlp, is trained differently on purpose (no convolutions, another
half of the data, pixel noise, label smoothing, another seed) so that its errors are not the first one's. Trains on
the first half of `split_halves(seed=SPLIT_SEED)`, reports accuracy on the held-out second half and the real-vs-real
floor in its own features, and writes both, with the command, into OUT/README.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from onestep.data.augment import pixel_noise, shift
from onestep.data.digits import load_digits_tensors, split_halves
from onestep.eval.classifier import DEFAULT_CLASSIFIER_DIR, DigitsClassifier
from onestep.eval.fd import real_vs_real_floor


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (model(images).argmax(1) == labels).float().mean().item()


def train(images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int, batch_size: int = 64,
          lr: float = 2e-3, noise_std: float = 0.0, label_smoothing: float = 0.0, **model_config) -> DigitsClassifier:
    """AdamW with cosine decay on ±1-pixel shifted (and, with `noise_std`, noised) batches; deterministic given
    `seed`. `model_config` goes to DigitsClassifier (architecture, hidden, dropout)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitsClassifier(**model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        batch = shift(images[idx], generator)
        if noise_std:
            batch = pixel_noise(batch, generator, noise_std)
        loss = F.cross_entropy(model(batch), labels[idx], label_smoothing=label_smoothing)
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
    parser.add_argument("--split-seed", type=int, default=0, help="train on the first half of split_halves(seed)")
    parser.add_argument("--architecture", choices=["cnn", "mlp"], default="cnn")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256], help="mlp: hidden widths")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--noise-std", type=float, default=0.0, help="Gaussian pixel noise augmentation")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # a tiny net: one thread is fastest and keeps the result independent of the core count
    start = time.perf_counter()
    images, labels = load_digits_tensors()
    first, second = split_halves(labels.numpy(), seed=args.split_seed)
    model_config = {"architecture": args.architecture, "dropout": args.dropout}
    if args.architecture == "mlp":
        model_config["hidden"] = tuple(args.hidden)
    model = train(images[first], labels[first], args.steps, args.seed, noise_std=args.noise_std,
                  label_smoothing=args.label_smoothing, **model_config)
    train_acc = accuracy(model, images[first], labels[first])
    held_out = accuracy(model, images[second], labels[second])
    seconds = time.perf_counter() - start
    floor = real_vs_real_floor(seed=0, classifier=model).value
    print(f"train accuracy {train_acc:.4f} ({len(first)} images), held-out accuracy {held_out:.4f} "
          f"({len(second)} images), {seconds:.1f} s; real-vs-real floor in its features {floor:.3f}")

    model.save_pretrained(args.out, safe_serialization=True)
    command = shlex.join(["python", "scripts/train_classifier.py", *(argv if argv is not None else sys.argv[1:])])
    body = "CNN" if args.architecture == "cnn" else f"MLP on the 64 raw pixels (hidden widths {args.hidden})"
    augment = "±1-pixel shift" + (f", Gaussian pixel noise std {args.noise_std}" if args.noise_std else "")
    (args.out / "README.md").write_text(
        f"# digits classifier: a {args.architecture.upper()} judge\n\n"
        f"A small {body} on scikit-learn's 8x8 digits (inputs in [-1, 1]); its 64-d penultimate activations are "
        "the features of a Fréchet distance (not Inception FID), its argmax gives class shares and forgetting.\n\n"
        f"- trained on the first half of `split_halves(labels, seed={args.split_seed})` ({len(first)} images), "
        f"{args.steps} steps, seed {args.seed}, AdamW lr 2e-3 cosine, batch 64, {augment} augmentation, "
        f"label smoothing {args.label_smoothing}, dropout {args.dropout}\n"
        f"- held-out accuracy (second half, {len(second)} images): **{held_out:.2%}**\n"
        f"- train accuracy: {train_acc:.2%}\n"
        f"- Fréchet distance in its features between the two halves of `split_halves(seed=0)` (the real-vs-real "
        f"floor, `real_vs_real_floor(seed=0, classifier=...)`): {floor:.3f}\n"
        f"- command: `{command}`\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
