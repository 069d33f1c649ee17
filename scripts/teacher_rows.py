"""Regenerate the teacher rows shipped with the builtin teachers (onestep/assets/*/teacher_rows.json), so that the
tables of `make demo` (`onestep bench`), `make demo-t2i` and `make demo-flow` (scripts/t2i_table.py) read their
teacher rows instead of resampling the teacher every time. `onestep bench` measures images/s anew each time; the
t2i and flow rows keep the images/s measured here, with torch's thread count (OMP_NUM_THREADS), which each row
records.

    python scripts/teacher_rows.py [digits] [t2i] [flow]

Run it after changing a builtin teacher, a judge or a table's protocol (tests/test_teacher_rows.py then fails: the
shipped rows no longer match). Each row is sampled and scored afresh under the protocol the demo uses: `onestep
bench`'s defaults and configs/digits/dmd2.yaml's teacher; scripts/t2i_table.py's defaults and configs/t2i/dmd2.yaml
(builtin:digits-t2i, DDIM) or configs/flow/dmd2.yaml (builtin:digits-flow, Euler).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from onestep.bench.compare import sample_teacher_row, teacher_row_protocol
from onestep.bench.t2i_teacher import T2I_STEPS, t2i_teacher_protocol, t2i_teacher_rows, table_config
from onestep.bench.teacher_rows import CARD_FILE, store
from onestep.cli import build_parser
from onestep.config import load_config, reference_guidance, to_dict
from onestep.models.loading import resolve_model
from onestep.runs import build_judge


ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python scripts/teacher_rows.py"
HEADER = {"about": f"Teacher rows of the demo tables, read by onestep.bench.teacher_rows; written by `{COMMAND}` "
                   "(run it again after changing this teacher, a judge or a table's protocol)."}


def digits_rows() -> None:
    cfg = load_config(ROOT / "configs" / "digits" / "dmd2.yaml")
    bench = build_parser().parse_args(["bench", "--out", "unused"])  # the table's defaults, as `make demo` runs it
    teacher = resolve_model(cfg.teacher.path)
    (teacher / CARD_FILE).unlink(missing_ok=True)  # rows of an older protocol would stay as dead entries
    for k in bench.teacher_steps:
        protocol = teacher_row_protocol(k, reference_guidance(to_dict(cfg)), bench.num_samples or 1000, bench.seeds,
                                        bench.forget)
        start = time.perf_counter()
        row = sample_teacher_row(teacher, protocol)
        store(teacher / CARD_FILE, teacher, protocol, row, COMMAND, HEADER)
        print(f"digits teacher DDIM {k}: FD-digits {row['fd']:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)


def t2i_rows(table: str = "t2i") -> None:
    """The rows of scripts/t2i_table.py for the teacher of configs/TABLE/dmd2.yaml (t2i or flow), under both judges."""
    cfg = table_config(load_config(ROOT / "configs" / table / "dmd2.yaml"))
    teacher = resolve_model(cfg.teacher.path, cfg.teacher.revision)
    judge = build_judge(cfg, None, is_text=True)
    (teacher / CARD_FILE).unlink(missing_ok=True)
    for k in T2I_STEPS:
        start = time.perf_counter()
        rows = t2i_teacher_rows(cfg, judge, k)  # one sampling, both judges: one card entry each
        for features, row in rows.items():
            store(teacher / CARD_FILE, teacher, t2i_teacher_protocol(cfg, judge, k, features), row, COMMAND, HEADER)
        print(f"{table}: {rows['t2i']['name']}: FD-t2i {rows['t2i']['fd_t2i']:.3f}, FD-t2i_mlp "
              f"{rows['t2i_mlp']['fd_t2i_mlp']:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="*", choices=["digits", "t2i", "flow"], default=["digits", "t2i", "flow"])
    args = parser.parse_args(argv)
    for table in args.tables:
        digits_rows() if table == "digits" else t2i_rows(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
