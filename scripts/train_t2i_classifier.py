"""Train the shipped coloured-digits classifier (the evaluator of builtin:digits-t2i): digit and colour heads.

    python scripts/train_t2i_classifier.py --out onestep/assets/digits_t2i_classifier --seed 0 --steps 1500

Trains on the coloured versions of the first half of `split_halves(seed=0)` of scikit-learn's digits, reports digit
and colour accuracy on the coloured second half and the FD-t2i real-vs-real floor (first half vs all), and writes
them, with the command, into OUT/README.md.
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

from onestep.data.augment import shift
from onestep.data.digits import split_halves
from onestep.data.digits_t2i import coloured_digits
from onestep.eval.fd import frechet_distance
from onestep.eval.features import FeatureOptions
from onestep.eval.quantize import to_uint8
from onestep.eval.t2i_classifier import DEFAULT_T2I_CLASSIFIER_DIR, ColouredDigitsClassifier, classify


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """±2-pixel shifts and a random brightness in [0.6, 1.1] (samples are often dimmer or brighter than the data)."""
    scale = 0.6 + 0.5 * torch.rand(x.shape[0], 1, 1, 1, generator=generator)
    return (((shift(x, generator, 2) + 1) * scale).clamp(0, 2)) - 1


def train(images, digits, colours, steps: int, seed: int, batch_size: int = 64, lr: float = 2e-3):
    """AdamW with cosine decay, summed cross-entropy of both heads; deterministic given `seed`."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ColouredDigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        digit_logits, colour_logits = model(augment(images[idx], generator))
        loss = F.cross_entropy(digit_logits, digits[idx]) + F.cross_entropy(colour_logits, colours[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_T2I_CLASSIFIER_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    start = time.perf_counter()
    images, digits, colours = coloured_digits()
    first, second = split_halves(digits[:1797].numpy(), seed=0)
    train_idx = np.concatenate([first + 1797 * c for c in range(4)])
    test_idx = np.concatenate([second + 1797 * c for c in range(4)])
    model = train(images[train_idx], digits[train_idx], colours[train_idx], args.steps, args.seed)
    pred_digits, pred_colours = classify(model, to_uint8(images[test_idx]))
    digit_acc = (pred_digits == digits[test_idx]).float().mean().item()
    colour_acc = (pred_colours == colours[test_idx]).float().mean().item()
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out, safe_serialization=True)
    floor = frechet_distance(to_uint8(images[train_idx]), "digits_t2i", "t2i",
                             options=FeatureOptions(extra={"t2i_classifier": str(args.out)})).value
    print(f"held-out ({len(test_idx)} images): digit accuracy {digit_acc:.4f}, colour accuracy {colour_acc:.4f}; "
          f"{seconds:.1f} s; FD-t2i of the training half vs all real {floor:.3f}")
    command = shlex.join(["python", "scripts/train_t2i_classifier.py", *(argv if argv is not None else sys.argv[1:])])
    (args.out / "README.md").write_text(
        "# coloured-digits classifier (the evaluator of builtin:digits-t2i)\n\n"
        "A small CNN on 32x32 coloured digits (inputs in [-1, 1]) with a digit head (10) and a colour head "
        "(red, green, blue, yellow); its 64-d penultimate activations are the features of FD-t2i (a Fréchet "
        "distance in this network's feature space, not Inception FID).\n\n"
        f"- trained on the coloured first half of `split_halves(digits, seed=0)` ({len(train_idx)} images), "
        f"{args.steps} steps, seed {args.seed}, ±2-pixel shifts and brightness 0.6-1.1\n"
        f"- held-out (coloured second half, {len(test_idx)} images): digit accuracy **{digit_acc:.2%}**, "
        f"colour accuracy **{colour_acc:.2%}**\n"
        f"- FD-t2i of the training half against all 7188 real images (a real-vs-real floor): {floor:.3f}\n"
        f"- command: `{command}`\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
