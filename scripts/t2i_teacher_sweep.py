"""Guidance sweep of a digits text-to-image teacher: FD-t2i, digit / colour accuracy, colour balance per scale.

    python scripts/t2i_teacher_sweep.py builtin:digits-t2i --steps 25 --guidance 1 2 3 4 5 7.5 --num-samples 1000
    python scripts/t2i_teacher_sweep.py builtin:digits-flow --steps 4 10 25 --guidance 1 2 3 4 5 7.5 \
        --num-samples 1000 --out flow_sweep.json

Steps are DDIM steps for a UNet teacher, Euler steps of its ODE for a flow teacher (each row names its `sampler`).

Prints one JSON line per (steps, scale) and, with --out, writes them all as one JSON file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from onestep.eval.judge import digits_t2i_judge
from onestep.files import write_json_atomic
from onestep.models.teacher import Teacher
from onestep.sampling.teacher import sampler_label


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher")
    parser.add_argument("--steps", type=int, nargs="+", default=[25])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0, 5.0, 7.5])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    teacher = Teacher.from_pretrained(args.teacher)
    judge = digits_t2i_judge(args.num_samples, args.seed)
    sampler = sampler_label(teacher)
    rows = []
    for steps in args.steps:
        for scale in args.guidance:
            metrics = judge.teacher_metrics(teacher, [steps], guidance_scale=scale)
            suffix = f"/teacher_{sampler}{steps}"
            row = {"sampler": sampler, "steps": steps, "guidance": scale,
                   **{k.removesuffix(suffix): v for k, v in metrics.items() if k.endswith(suffix)}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        write_json_atomic(args.out, {"teacher": args.teacher, "protocol": judge.protocol,
                                     "num_samples": args.num_samples, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
