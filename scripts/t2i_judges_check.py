"""Check the two t2i judges' errors against each other (docs/evaluation.md, "Two t2i judges").

    python scripts/t2i_judges_check.py real [--out DIR]
    python scripts/t2i_judges_check.py sample-teacher SAMPLES.npz [--num-samples 500] [--steps 25] [--guidance 2]
    python scripts/t2i_judges_check.py samples SAMPLES.npz [--out DIR]

`real`: on the 7188 real coloured digits, per half of `split_halves(seed=0)` (the first judge trained on the first
half, the second on the second: each half is held out for one judge), both judges' digit / colour accuracy, how
often they disagree, the correlation of their per-image probability of the true digit and of their errors; and the
real-vs-real floor of each judge's FD at N = 1000 (three draws of 1000 real images against all 7188).
`sample-teacher`: draws the teacher's samples for `eval_prompts(N)` (half uncoloured, alternating) from noise seed
1234 and writes them as a SAMPLES.npz (`onestep fid` reads it too), a batch at a time (a stopped run keeps what it
drew).
`samples`: the same comparison on generated samples against the prompts they were asked for, each judge's FD and
its ratio to its floor at the same N, and a grid of the samples the judges disagree on most (DIR/disagreements.png).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from onestep.data.digits import split_halves
from onestep.data.digits_t2i import COLOUR_NAMES, WORDS, coloured_digits, eval_prompts, parse_caption
from onestep.eval.fd import frechet_distance
from onestep.eval.quantize import to_uint8, uint8_to_float
from onestep.eval.t2i_classifier import T2I_JUDGES, load_t2i_judge


@torch.no_grad()
def probabilities(images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{judge: (digit probabilities (N, 10), colour probabilities (N, 4))} of uint8 images."""
    out = {}
    for name in T2I_JUDGES:
        model, parts = load_t2i_judge(name), []
        for batch in images.split(500):
            digit, colour = model(uint8_to_float(batch))
            parts.append((digit.softmax(1), colour.softmax(1)))
        out[name] = tuple(torch.cat(p) for p in zip(*parts, strict=True))
    return out


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def compare(probs: dict, digits: torch.Tensor, colours: torch.Tensor) -> dict:
    """Each judge's accuracy against the asked-for digit / colour (colour: where one is asked for), their
    disagreement rates, the correlation of their probability of the asked-for digit and of their digit errors."""
    (da, ca), (db, cb) = probs["t2i"], probs["t2i_mlp"]
    named = colours >= 0
    wrong_a, wrong_b = da.argmax(1) != digits, db.argmax(1) != digits
    report = {"num_images": len(digits)}
    for name, (d, c) in probs.items():
        report[f"digit_acc/{name}"] = float((d.argmax(1) == digits).float().mean())
        if named.any():
            report[f"colour_acc/{name}"] = float((c.argmax(1)[named] == colours[named]).float().mean())
        if (~named).any():
            shares = torch.bincount(c.argmax(1)[~named], minlength=4).double() / int((~named).sum())
            report[f"colour_balance/{name}"] = float((shares - 0.25).abs().max())
            report[f"colour_shares/{name}"] = dict(zip(COLOUR_NAMES, [round(float(s), 3) for s in shares],
                                                       strict=True))
    report.update({
        "digit_disagreement": float((da.argmax(1) != db.argmax(1)).float().mean()),
        "colour_disagreement": float((ca.argmax(1) != cb.argmax(1)).float().mean()),
        "corr_p_asked_digit": correlation(da.gather(1, digits[:, None])[:, 0], db.gather(1, digits[:, None])[:, 0]),
        "corr_digit_errors": correlation(wrong_a.float(), wrong_b.float()),
        "both_wrong": int((wrong_a & wrong_b).sum()), "wrong/t2i": int(wrong_a.sum()),
        "wrong/t2i_mlp": int(wrong_b.sum())})
    return report


def floors(n: int, draws: int = 3) -> dict:
    """Each judge's FD of n real images (draws without replacement, seeds 0..draws-1) against all 7188."""
    images = to_uint8(coloured_digits()[0])
    out = {}
    for name in T2I_JUDGES:
        fds = [frechet_distance(images[torch.from_numpy(np.random.default_rng(s).permutation(len(images))[:n])],
                                "digits_t2i", name).value for s in range(draws)]
        out[name] = {"mean": float(np.mean(fds)), "std": float(np.std(fds, ddof=1)), "draws": fds}
    return out


def real_report() -> dict:
    images, digits, colours = coloured_digits()
    probs = probabilities(to_uint8(images))
    first, second = split_halves(digits[:1797].numpy(), seed=0)
    report = {}
    for half, idx, held_out_for in (("first", first, "t2i_mlp (t2i trained on it)"),
                                    ("second", second, "t2i (t2i_mlp trained on it)")):
        rows = torch.from_numpy(np.concatenate([idx + 1797 * c for c in range(4)]))
        report[f"{half} half, held out for {held_out_for}"] = compare(
            {k: (d[rows], c[rows]) for k, (d, c) in probs.items()}, digits[rows], colours[rows])
    report["floor_fd_n1000"] = floors(1000)
    return report


def sample_teacher(out: Path, num_samples: int, steps: int, guidance: float, seed: int = 1234,
                   batch_size: int = 20) -> None:
    """The teacher's samples of eval_prompts(num_samples), appended to `out` a batch at a time; coloured and
    uncoloured prompts alternate, so that what a stopped run drew is still half uncoloured."""
    from onestep.files import atomic_file
    from onestep.sampling.inference import load_sampler

    listed, half = eval_prompts(num_samples)[0], num_samples // 2
    prompts = [p for pair in zip(listed[:half], listed[half:], strict=False) for p in pair] + listed[2 * half:]
    sampler = load_sampler("builtin:digits-t2i", steps=steps, guidance_scale=guidance)
    drawn = []
    for images, _, _ in sampler.batches(None, num_samples, seed, batch_size, prompts):
        drawn.append(to_uint8(images).permute(0, 2, 3, 1).numpy())
        with atomic_file(out) as f:
            np.savez(f, images=np.concatenate(drawn), prompts=np.array(prompts[:sum(map(len, drawn))]),
                     about=np.array(f"builtin:digits-t2i, {steps} DDIM steps, guidance {guidance}, noise seed "
                                    f"{seed}, eval_prompts({num_samples})"))
        print(f"{sum(map(len, drawn))} / {num_samples}", flush=True)


def samples_report(path: Path, out: Path | None) -> dict:
    with np.load(path, allow_pickle=False) as data:
        images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous()
        prompts = [str(p) for p in data["prompts"]]
    parsed = [parse_caption(p) for p in prompts]
    digits = torch.tensor([d for d, _ in parsed])
    colours = torch.tensor([-1 if c is None else c for _, c in parsed])
    probs = probabilities(images)
    report = {"samples": str(path), **compare(probs, digits, colours)}
    floor = floors(len(images))
    for name in T2I_JUDGES:
        fd = frechet_distance(images, "digits_t2i", name).value
        report[f"fd/{name}"] = fd
        report[f"floor_fd_n{len(images)}/{name}"] = floor[name]
        report[f"fd_over_floor/{name}"] = fd / floor[name]["mean"]
    if out is not None:
        from onestep.eval.grid import save_grid

        (da, ca), (db, cb) = probs["t2i"], probs["t2i_mlp"]
        gap = (da - db).abs().sum(1) / 2 + (ca - cb).abs().sum(1) / 2  # total variation, digit + colour
        worst = gap.argsort(descending=True)[:24]
        labels = [f"{prompts[i]}: {WORDS[da[i].argmax()]} {COLOUR_NAMES[ca[i].argmax()]} / "
                  f"{WORDS[db[i].argmax()]} {COLOUR_NAMES[cb[i].argmax()]}" for i in worst.tolist()]
        save_grid(images[worst], out / "disagreements.png", nrow=6, scale=4, labels=labels)
        report["disagreements_grid"] = {"file": str(out / "disagreements.png"), "labels": labels,
                                        "legend": "prompt: t2i's digit colour / t2i_mlp's digit colour"}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["real", "sample-teacher", "samples"])
    parser.add_argument("samples", type=Path, nargs="?")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.what != "real" and args.samples is None:
        parser.error(f"{args.what} needs SAMPLES.npz")
    if args.what == "sample-teacher":
        sample_teacher(args.samples, args.num_samples, args.steps, args.guidance)
        return 0
    report = real_report() if args.what == "real" else samples_report(args.samples, args.out)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.what}.json").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
