"""The digits-t2i table of a distillation run: its one-step student (the run's final metrics) against its teacher at
4, 10 and 25 guided steps of the teacher's sampler (DDIM for builtin:digits-t2i, the Euler ODE on the flow schedule
for builtin:digits-flow), on the same prompts, noise seed and classifier.

    python scripts/t2i_table.py runs/t2i_dmd2 [--steps 4 10 25] [--out TABLE.json] [--no-cache]

The teacher's rows come from the teacher-row cache when it holds them (onestep/bench/teacher_rows.py: shipped with
the builtin teachers by scripts/teacher_rows.py, else filled on first use); --no-cache resamples them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from onestep.bench.t2i_teacher import COLUMNS, T2I_STEPS, cached_t2i_teacher_row
from onestep.config import config_from
from onestep.files import write_json_atomic
from onestep.runs import build_judge


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--steps", type=int, nargs="+", default=list(T2I_STEPS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-cache", action="store_true", help="resample the teacher's rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = config_from(json.loads((args.run / "config.json").read_text()))
    final = json.loads((args.run / "metrics.json").read_text())["final"]
    rows = [{"name": f"{cfg.method} 1 step", **{c: final[f"{c}/student"] for c in COLUMNS}}]
    judge = build_judge(cfg, None, is_text=True)
    rows += [cached_t2i_teacher_row(cfg, judge, steps, not args.no_cache) for steps in args.steps]
    print(f"{'':<28}" + "".join(f"{c:>16}" for c in COLUMNS))
    for row in rows:
        print(f"{row['name']:<28}" + "".join(f"{row[c]:>16.3f}" for c in COLUMNS))
    for row in rows:
        if row.get("cached"):
            print(f"{row['name']}: read from the teacher-row cache ({row['cached']})")
    print(rows[-1].get("protocol", judge.protocol))
    if args.out:
        write_json_atomic(args.out, {"run": str(args.run), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
