"""Train a shipped coloured-digits judge (an evaluator of builtin:digits-t2i): digit and colour heads.

    python scripts/train_t2i_classifier.py --out onestep/assets/digits_t2i_classifier --seed 0 --steps 1500
    python scripts/train_t2i_classifier.py --out onestep/assets/digits_t2i_mlp_classifier --architecture mlp \
        --half second --seed 1 --steps 3000 --augment jitter --label-smoothing 0.1 --dropout 0.1

The first is FD-t2i's CNN; the second, FD-t2i_mlp, is trained differently on purpose (an MLP, the other half of the
data, another seed and augmentation, label smoothing) so that its errors are not the first one's. Trains on the
coloured versions of one half of `split_halves(seed=0)` of scikit-learn's digits, reports digit and colour accuracy
on the coloured other half and the real-vs-real floor in its features (training half vs all 7188), and writes them,
with the command, into OUT/README.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from onestep.data.augment import pixel_noise, shift
from onestep.data.digits import split_halves
from onestep.data.digits_t2i import coloured_digits
from onestep.eval.fd import frechet_distance
from onestep.eval.features import FeatureOptions
from onestep.eval.quantize import to_uint8
from onestep.eval.t2i_classifier import (
    DEFAULT_T2I_CLASSIFIER_DIR,
    ColouredDigitsClassifier,
    ColouredDigitsMLP,
    classify,
)


def shift_brightness(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """±2-pixel shifts and a random brightness in [0.6, 1.1] (samples are often dimmer or brighter than the data)."""
    scale = 0.6 + 0.5 * torch.rand(x.shape[0], 1, 1, 1, generator=generator)
    return (((shift(x, generator, 2) + 1) * scale).clamp(0, 2)) - 1


def jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """±1-pixel shifts, a blend with a [1 2 1]^2 blur (weight uniform in [0, 1]), a gain per channel in [0.75, 1.05]
    (keeps every colour's hue class: yellow's worst case (0.75, 1) is 75 degrees, nearer yellow's 60 than green's
    120) and Gaussian pixel noise of std 0.05."""
    n = x.shape[0]
    x = shift(x, generator, 1)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, [1] * 4, value=-1.0), kernel, groups=3)
    weight = torch.rand(n, 1, 1, 1, generator=generator)
    x = (1 - weight) * x + weight * blurred
    gain = 0.75 + 0.3 * torch.rand(n, 3, 1, 1, generator=generator)
    return pixel_noise(((x + 1) * gain).clamp(0, 2) - 1, generator, 0.05)


AUGMENTATIONS = {"shift-brightness": (shift_brightness, "±2-pixel shifts and brightness 0.6-1.1"),
                 "jitter": (jitter, "±1-pixel shifts, a random blend with a 3x3 blur, a gain per channel in "
                                    "[0.75, 1.05] (hue classes kept) and Gaussian pixel noise std 0.05")}


def train(images, digits, colours, steps: int, seed: int, batch_size: int = 64, lr: float = 2e-3,
          augment: str = "shift-brightness", label_smoothing: float = 0.0, architecture: str = "cnn", **config):
    """AdamW with cosine decay, summed cross-entropy of both heads; deterministic given `seed`. `config` goes to the
    model (the MLP's hidden widths and dropout)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ColouredDigitsMLP(**config) if architecture == "mlp" else ColouredDigitsClassifier(**config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    augmentation = AUGMENTATIONS[augment][0]
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        digit_logits, colour_logits = model(augmentation(images[idx], generator))
        loss = F.cross_entropy(digit_logits, digits[idx], label_smoothing=label_smoothing) + \
            F.cross_entropy(colour_logits, colours[idx], label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval().requires_grad_(False)


def coloured_halves(digits: torch.Tensor, half: str) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) indices into the 7188 coloured digits: every colour of one half of `split_halves(seed=0)`
    of the 1797 grey digits, and every colour of the other half."""
    first, second = split_halves(digits[:1797].numpy(), seed=0)
    train_half, test_half = (first, second) if half == "first" else (second, first)
    return (np.concatenate([train_half + 1797 * c for c in range(4)]),
            np.concatenate([test_half + 1797 * c for c in range(4)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_T2I_CLASSIFIER_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--architecture", choices=["cnn", "mlp"], default="cnn")
    parser.add_argument("--half", choices=["first", "second"], default="first",
                        help="train on this half of split_halves(seed=0), hold out the other")
    parser.add_argument("--augment", choices=list(AUGMENTATIONS), default="shift-brightness")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256], help="mlp: hidden widths")
    parser.add_argument("--dropout", type=float, default=0.0, help="mlp: dropout after each hidden layer")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    start = time.perf_counter()
    images, digits, colours = coloured_digits()
    train_idx, test_idx = coloured_halves(digits, args.half)
    config = {"hidden": tuple(args.hidden), "dropout": args.dropout} if args.architecture == "mlp" else {}
    model = train(images[train_idx], digits[train_idx], colours[train_idx], args.steps, args.seed,
                  augment=args.augment, label_smoothing=args.label_smoothing, architecture=args.architecture,
                  **config)
    pred_digits, pred_colours = classify(model, to_uint8(images[test_idx]))
    digit_acc = (pred_digits == digits[test_idx]).float().mean().item()
    colour_acc = (pred_colours == colours[test_idx]).float().mean().item()
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out, safe_serialization=True)
    features = "t2i" if args.architecture == "cnn" else "t2i_mlp"
    option = "t2i_classifier" if features == "t2i" else "t2i_mlp_classifier"
    floor = frechet_distance(to_uint8(images[train_idx]), "digits_t2i", features,
                             options=FeatureOptions(extra={option: str(args.out)})).value
    print(f"held-out ({len(test_idx)} images): digit accuracy {digit_acc:.4f}, colour accuracy {colour_acc:.4f}; "
          f"{seconds:.1f} s; FD-{features} of the training half vs all real {floor:.3f}")
    command = shlex.join(["python", "scripts/train_t2i_classifier.py", *(argv if argv is not None else sys.argv[1:])])
    other = "second" if args.half == "first" else "first"
    body = ("CNN" if args.architecture == "cnn" else
            f"MLP (2x2 average pooling to 3x16x16, hidden widths {args.hidden}, no convolution)")
    (args.out / "README.md").write_text(
        f"# coloured-digits classifier: the {args.architecture.upper()} judge of builtin:digits-t2i "
        f"(FD-{features})\n\n"
        f"A small {body} on 32x32 coloured digits (inputs in [-1, 1]) with a digit head (10) and a colour head "
        f"(red, green, blue, yellow); its {model.config.num_features}-d penultimate activations are the features of "
        f"FD-{features} (a Fréchet distance in this network's feature space, not Inception FID).\n\n"
        f"- trained on the coloured {args.half} half of `split_halves(digits, seed=0)` ({len(train_idx)} images), "
        f"{args.steps} steps, seed {args.seed}, AdamW lr 2e-3 cosine, batch 64, {AUGMENTATIONS[args.augment][1]}, "
        f"label smoothing {args.label_smoothing}" + (f", dropout {args.dropout}" if args.architecture == "mlp" else "")
        + "\n"
        f"- held-out (coloured {other} half, {len(test_idx)} images): digit accuracy **{digit_acc:.2%}**, "
        f"colour accuracy **{colour_acc:.2%}**\n"
        f"- FD-{features} of the training half against all 7188 real images (a real-vs-real floor): {floor:.3f}\n"
        f"- command: `{command}`\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
