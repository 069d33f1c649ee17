"""The digits-t2i table of distillation runs: their one-step students against the teacher at 4, 10 and 25 guided
steps of the teacher's sampler (DDIM for builtin:digits-t2i, the Euler ODE on the flow schedule for
builtin:digits-flow), on the same prompts and noise seed, under both t2i judges (FD-t2i and FD-t2i_mlp, each row's
ratio to the teacher at 25 steps under each, and the judges' disagreement).

    python scripts/t2i_table.py runs/t2i_dmd2 [runs/t2i_sid ...] [--steps 4 10 25] [--out TABLE.json] [--no-cache]

A student's numbers are its run's final evaluation when it has both judges, else its exported pipeline is sampled
and scored (onestep/bench/t2i_teacher.py). The teacher's rows come from the teacher-row cache when it holds them
(onestep/bench/teacher_rows.py: shipped with the builtin teachers by scripts/teacher_rows.py, else filled on first
use); --no-cache resamples them. `onestep bench` on digits-t2i runs prints the same table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from onestep.bench.t2i_teacher import T2I_STEPS, markdown, t2i_table
from onestep.errors import UserInputError
from onestep.files import write_json_atomic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--steps", type=int, nargs="+", default=list(T2I_STEPS))
    parser.add_argument("--out", type=Path, help="also write the table as JSON (and TABLE.md beside it)")
    parser.add_argument("--no-cache", action="store_true", help="resample the teacher's rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        table = t2i_table(args.runs, args.steps, not args.no_cache)
    except UserInputError as err:
        print(f"t2i_table: error: {err}", file=sys.stderr)
        return 2
    text = markdown(table)
    print(text)
    if args.out:
        write_json_atomic(args.out, table)
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
