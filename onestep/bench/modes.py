"""Mode coverage (`onestep bench --suite modes`): how a one-step student redistributes its teacher's modes.

For a teacher trained on a generated mode set (`onestep.data.modes`, configs/modes/teacher.yaml) and students
distilled from it, every sampler draws N samples per noise seed; each sample's mode and sub-mode is decided by rule
(`onestep.eval.modes`). Reported per sampler: mode shares against the data's weights and the teacher's shares, the
mode-weight error (max |share - teacher share|), each sub-mode's rate relative to the teacher's and the worst one,
the off-mode rate; standard errors stated. Target (issue 18): mode-weight error <= 0.03, worst sub-mode >= 0.7x.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from onestep.bench.compare import finished_runs
from onestep.data.modes import ModeSet, mode_set
from onestep.eval.modes import ModeCounts, count_modes, coverage
from onestep.eval.quantize import to_uint8
from onestep.files import atomic_file, write_json_atomic
from onestep.sampling.inference import FolderSampler, load_sampler


MAX_MODE_ERROR, MIN_SUBMODE_RATIO = 0.03, 0.7


def sampler_counts(sampler: FolderSampler, modes_of: ModeSet, num_samples: int, seeds: list[int],
                   batch_size: int = 1000) -> ModeCounts:
    """Mode and sub-mode counts of `num_samples` unconditional samples per noise seed, pooled over the seeds."""
    counts = None
    for seed in seeds:
        for images, _, _ in sampler.batches(None, num_samples, seed, batch_size):
            batch = count_modes(to_uint8(images), modes_of)
            counts = batch if counts is None else counts + batch
    return counts


def mode_row(name: str, counts: ModeCounts, teacher: ModeCounts, nfe: int, **extra) -> dict:
    """One sampler's coverage against the teacher, its error against the data's weights, and the target verdict."""
    row = {"name": name, "nfe": nfe, **coverage(counts, teacher),
           "mode_error_vs_data": float(np.abs(counts.mode_shares - counts.modes_of.mode_weights()).max()), **extra}
    worst = row["worst_submode_ratio"]
    if "target_met" not in extra:  # the teacher's own row is the reference, not a verdict (None)
        row["target_met"] = bool(row["mode_weight_error"] <= MAX_MODE_ERROR and worst is not None
                                 and worst >= MIN_SUBMODE_RATIO)
    return row


def run_modes_suite(runs: list[Path], out: Path, num_samples: int = 10000, teacher_steps: int = 50,
                    seeds: list[int] = (0, 1, 2), modes: str = "squares") -> dict:
    """Mode coverage of the runs' exported students against their shared teacher (DDIM `teacher_steps`), the
    teacher trained on the mode set named `modes` (`onestep.data.modes.MODE_SETS`)."""
    modes_of = mode_set(modes)
    configs, teacher_path, _ = finished_runs(runs)
    seeds = list(seeds)
    teacher = load_sampler(teacher_path, steps=teacher_steps)
    if teacher.num_classes or teacher.is_text:
        from onestep.errors import UserInputError

        raise UserInputError(f"suite modes needs an unconditional teacher (configs/modes/teacher.yaml); "
                             f"{teacher_path} is conditional")
    reference = sampler_counts(teacher, modes_of, num_samples, seeds)
    if reference.off_mode > 0.5:  # most likely a teacher of the other set: every row would be meaningless
        print(f"warning: the teacher draws {reference.off_mode:.0%} off-mode samples of mode set {modes!r}; "
              f"was it trained on another (--mode-set)?", file=sys.stderr)
    rows = [mode_row(f"teacher DDIM {teacher_steps}", reference, reference, teacher.nfe, target_met=None)]
    for run, cfg in configs.items():
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
        student = load_sampler(run / "pipeline")
        counts = sampler_counts(student, modes_of, num_samples, seeds)
        rows.append(mode_row(f"{cfg['method']} ({run.name})", counts, reference, student.nfe,
                             steps=metrics.get("step"), train_seconds=metrics.get("train_seconds")))
        print(f"{rows[-1]['name']}: mode-weight error {rows[-1]['mode_weight_error']:.3f}, worst sub-mode "
              f"{_worst(rows[-1])}", flush=True)
    report = {"rows": rows, "teacher": str(teacher_path), "teacher_steps": teacher_steps, "seeds": seeds,
              "num_samples_per_seed": num_samples, "mode_set": modes,
              "data_weights": dict(zip(modes_of.names, modes_of.mode_weights().tolist(), strict=True)),
              "quadrant_weights": list(modes_of.quadrant_weights),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "modes.json", report)
    table = markdown(report)
    with atomic_file(out / "modes.md") as f:
        f.write(table.encode())
    print(table)
    return report


def markdown(report: dict) -> str:
    n = report["num_samples_per_seed"] * len(report["seeds"])
    names = list(report["data_weights"])
    weights = " / ".join(f"{k} {v:g}" for k, v in report["data_weights"].items())
    lines = [f"Mode coverage against the teacher ({report['teacher']}, DDIM {report['teacher_steps']}): N = {n} "
             f"samples per sampler ({report['num_samples_per_seed']} per noise seed, seeds {report['seeds']}); "
             f"mode and sub-mode (quadrant) by rule (onestep.eval.modes); mode set {report['mode_set']}, data weights "
             f"{weights}, quadrants {' / '.join(f'{w:g}' for w in report['quadrant_weights'])}; shares are of "
             f"all samples (off-mode included); ± one standard error. Target: mode-weight error <= "
             f"{MAX_MODE_ERROR}, worst sub-mode >= {MIN_SUBMODE_RATIO}x the teacher's rate. {report['machine']}.", "",
             f"| sampler | NFE | {' | '.join(names)} | off-mode | mode-weight error vs teacher | vs data | "
             "worst sub-mode / teacher | target | training |",
             "|---|---|" + "---|" * len(names) + "---|---|---|---|---|---|"]
    for r in report["rows"]:
        shares = " | ".join(f"{r['mode_shares'][k]:.3f}" for k in names)
        training = f"{r['steps']} steps, {r['train_seconds'] / 60:.1f} min" if r.get("train_seconds") else "–"
        lines.append(f"| {r['name']} | {r['nfe']} | {shares} | {r['off_mode']:.3f} | {r['mode_weight_error']:.3f} ± "
                     f"{r['mode_weight_error_se']:.3f} ({r['worst_mode']}) | {r['mode_error_vs_data']:.3f} | "
                     f"{_worst(r)} | "
                     f"{ {True: 'met', False: 'missed', None: 'reference'}[r['target_met']]} | {training} |")
    return "\n".join(lines) + "\n"


def _worst(row: dict) -> str:
    if row["worst_submode_ratio"] is None:
        return "– (the teacher drew no sub-mode)"
    return f"{row['worst_submode_ratio']:.2f}x ± {row['worst_submode_ratio_se']:.2f} ({row['worst_submode']})"
