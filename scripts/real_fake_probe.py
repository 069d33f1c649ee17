"""How separable are a sampler's digits from the real ones, clean and under pixel noise? (A GAN's discriminator can
only use what survives the noise it is shown.)

    python scripts/real_fake_probe.py runs/dmd2_full/pipeline [--steps 1] [--sigmas 0 0.2 0.5]

Draws one sample per real digit (same labels), trains a small CNN to tell real from sampled on 1200 of the pairs
(1500 Adam steps, batch 64 + 64, x + sigma * noise) and prints its accuracy on the other 597 pairs per sigma
(0.5 = chance). Images are in [-1, 1].
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

from onestep.data.digits import load_digits_tensors
from onestep.sampling.inference import load_sampler


def probe_accuracy(real: torch.Tensor, fake: torch.Tensor, sigma: float, seed: int = 1, steps: int = 1500) -> float:
    """Held-out accuracy of a small CNN telling `real` from `fake` (paired, same length) under noise of std sigma."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(len(real), generator=generator)
    train, test = order[:1200], order[1200:]
    net = nn.Sequential(nn.Conv2d(real.shape[1], 32, 3, padding=1), nn.SiLU(),
                        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
                        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(), nn.LazyLinear(1))
    labels = torch.cat([torch.ones(64), torch.zeros(64)])
    net(real[:1])  # materialise the lazy layer before the optimizer sees it
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(steps):
        idx = train[torch.randint(0, len(train), (64,), generator=generator)]
        x = torch.cat([real[idx], fake[idx]])
        loss = nn.functional.binary_cross_entropy_with_logits(net(x + sigma * torch.randn_like(x)).squeeze(1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        x = torch.cat([real[test], fake[test]])
        truth = torch.cat([torch.ones(len(test)), torch.zeros(len(test))])
        return ((net(x + sigma * torch.randn_like(x)).squeeze(1) > 0).float() == truth).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sampler", help="a pipeline or teacher folder (builtin:digits for the teacher)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps of a teacher (a student uses 1)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.2, 0.5])
    parser.add_argument("--seed", type=int, default=7, help="noise seed of the samples")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    real, labels = load_digits_tensors()
    fake = load_sampler(args.sampler, steps=args.steps).sample(labels, len(labels), seed=args.seed)
    print(json.dumps({"sampler": args.sampler, "steps": args.steps,
                      "accuracy": {str(s): round(probe_accuracy(real, fake, s), 3) for s in args.sigmas}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
