"""The digits-t2i table of a distillation run: its one-step student (the run's final metrics) against its teacher at
4, 10 and 25 guided DDIM steps, on the same prompts, noise seed and classifier.

    python scripts/t2i_table.py runs/t2i_dmd2 [--steps 4 10 25] [--out TABLE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from onestep.config import config_from
from onestep.files import write_json_atomic
from onestep.runs import build_judge, load_teacher


COLUMNS = ("fd_t2i", "digit_acc", "colour_acc", "colour_balance", "images_per_s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 10, 25])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = config_from(json.loads((args.run / "config.json").read_text()))
    final = json.loads((args.run / "metrics.json").read_text())["final"]
    rows = [{"name": f"{cfg.method} 1 step", **{c: final[f"{c}/student"] for c in COLUMNS}}]
    teacher = load_teacher(cfg)
    judge = build_judge(cfg, None, is_text=True)
    for steps in args.steps:
        metrics = judge.teacher_metrics(teacher, [steps])
        rows.append({"name": f"teacher {steps} DDIM (cfg {teacher.guidance_scale:g})",
                     **{c: metrics[f"{c}/teacher_ddim{steps}"] for c in COLUMNS}})
    print(f"{'':<28}" + "".join(f"{c:>16}" for c in COLUMNS))
    for row in rows:
        print(f"{row['name']:<28}" + "".join(f"{row[c]:>16.3f}" for c in COLUMNS))
    print(judge.protocol)
    if args.out:
        write_json_atomic(args.out, {"run": str(args.run), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
