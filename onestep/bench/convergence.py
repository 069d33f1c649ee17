"""Convergence over seeds: FD-vs-step curves of finished runs, grouped by method, and how soon each group reaches
the baseline's final FD (DisBack's claim). Stage-1 work recorded by a run (DisBack's degradation path) is added to
its step count, one path step counted as one training step."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from onestep.errors import UserInputError
from onestep.runs import RUN_CONFIG


def _curve(run: Path) -> tuple[list[int], list[float]]:
    metrics_file = run / "metrics.json"
    if not (run / RUN_CONFIG).is_file() or not metrics_file.is_file():
        raise UserInputError(f"{run} is not a finished run folder (needs {RUN_CONFIG} and metrics.json)")
    history = json.loads(metrics_file.read_text())["history"]
    points = [(h["step"], v) for h in history for k, v in h.items()
              if k.endswith("/student") and k.startswith(("fd_digits", "fid"))]
    return [s for s, _ in points], [v for _, v in points]


def stage_one_steps(run: Path) -> int:
    """Steps a run spent before its own training loop (DisBack's path recording), 0 for other methods."""
    index = run / "path" / "path.json"
    return json.loads(index.read_text())["steps"] if index.is_file() else 0


def convergence_report(runs: list[Path], baseline: str) -> dict:
    """Per method: mean / std FD at each evaluated step over its runs (seeds), and the first step (stage 1
    included) at which the mean curve reaches the baseline method's mean final FD, as a share of its final step."""
    groups: dict[str, list[Path]] = {}
    for run in runs:
        method = json.loads((run / RUN_CONFIG).read_text())["method"] if (run / RUN_CONFIG).is_file() else None
        groups.setdefault(method, []).append(run)
    if baseline not in groups:
        raise UserInputError(f"no run of the baseline method {baseline!r} among {', '.join(map(str, groups))}")
    report = {"baseline": baseline, "methods": {}}
    for method, members in groups.items():
        curves = [_curve(run) for run in members]
        steps = curves[0][0]
        if any(c[0] != steps for c in curves):
            raise UserInputError(f"the {method} runs were evaluated at different steps; use one eval_every")
        offset = max(stage_one_steps(run) for run in members)
        values = list(zip(*(c[1] for c in curves), strict=True))
        report["methods"][method] = {
            "runs": [str(r) for r in members], "stage_one_steps": offset, "steps": steps,
            "fd_mean": [statistics.mean(v) for v in values],
            "fd_std": [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values],
            "final_per_run": [c[1][-1] for c in curves]}
    target = report["methods"][baseline]["fd_mean"][-1]
    base_steps = report["methods"][baseline]["steps"][-1]
    report["target_fd"] = target
    for entry in report["methods"].values():
        reached = next((s for s, v in zip(entry["steps"], entry["fd_mean"], strict=True) if v <= target), None)
        entry["steps_to_target"] = None if reached is None else reached + entry["stage_one_steps"]
        entry["share_of_baseline_steps"] = None if reached is None else entry["steps_to_target"] / base_steps
    return report


def markdown(report: dict) -> str:
    lines = [f"Target: the {report['baseline']} runs' mean final FD {report['target_fd']:.2f} (training-time judge). "
             "Steps include stage-1 work (DisBack's path recording, one path step = one training step).", "",
             "| method | seeds | final FD (mean ± std) | stage-1 steps | steps to target | share of baseline steps |",
             "|---|---|---|---|---|---|"]
    for method, e in report["methods"].items():
        finals = e["final_per_run"]
        spread = f" ± {statistics.stdev(finals):.2f}" if len(finals) > 1 else ""
        share = "not reached" if e["share_of_baseline_steps"] is None else f"{100 * e['share_of_baseline_steps']:.0f}%"
        lines.append(f"| {method} | {len(finals)} | {statistics.mean(finals):.2f}{spread} | {e['stage_one_steps']} | "
                     f"{e['steps_to_target'] if e['steps_to_target'] is not None else '–'} | {share} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Mean FD (band: ± std over seeds) against training steps, stage-1 work shifting a curve to the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for method, e in report["methods"].items():
        x = [s + e["stage_one_steps"] for s in e["steps"]]
        lo = [m - s for m, s in zip(e["fd_mean"], e["fd_std"], strict=True)]
        hi = [m + s for m, s in zip(e["fd_mean"], e["fd_std"], strict=True)]
        ax.plot(x, e["fd_mean"], marker="o", ms=3, label=f"{method} ({len(e['runs'])} seeds)")
        ax.fill_between(x, lo, hi, alpha=0.2)
    ax.axhline(report["target_fd"], ls="--", lw=0.8, color="gray")
    ax.set_xlabel("training steps (incl. stage-1 path recording)")
    ax.set_ylabel("FD (training-time judge, seed 1234)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_convergence(runs: list[Path], out: Path, baseline: str) -> dict:
    report = convergence_report(runs, baseline)
    out.mkdir(parents=True, exist_ok=True)
    (out / "convergence.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out / "convergence.md").write_text(table)
    plot(report, out / "convergence.png")
    print(table)
    return report
