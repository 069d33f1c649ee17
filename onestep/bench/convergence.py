"""Convergence over seeds: FD-vs-step curves of finished runs, grouped by method, and how soon each group reaches
the baseline's final FD (DisBack's claim). The FD is the training-time judge's (FD-digits, FID or FD-t2i); what the
runs record beside it (digits-t2i runs: the second judge's FD-t2i_mlp, digit accuracy, colour balance) is averaged
the same way, tabulated at the end and plotted in panels beside it. Stage-1 work recorded by a run (DisBack's
degradation path) is added to its step count, one path step counted as one training step."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from onestep.errors import UserInputError
from onestep.runs import RUN_CONFIG


PRIMARY_FDS = ("fd_digits", "fid", "fd_t2i")  # the training-time judge's distance: the target and the first panel
SIDE_METRICS = ("digit_acc", "colour_balance")  # plotted beside FD when a run records them (digits-t2i runs)


def _series(run: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{key: (steps, values)} of the run's history, for every `<key>/student` that is a Fréchet distance (fd_*,
    fid: e.g. fd_t2i and the second judge's fd_t2i_mlp) or a side metric (digit_acc, colour_balance)."""
    metrics_file = run / "metrics.json"
    if not (run / RUN_CONFIG).is_file() or not metrics_file.is_file():
        raise UserInputError(f"{run} is not a finished run folder (needs {RUN_CONFIG} and metrics.json)")
    series: dict[str, tuple[list[int], list[float]]] = {}
    for h in json.loads(metrics_file.read_text())["history"]:
        for k, v in h.items():
            key = k.removesuffix("/student")
            if key != k and (key.startswith("fd_") or key == "fid" or key in SIDE_METRICS):
                steps, values = series.setdefault(key, ([], []))
                steps.append(h["step"])
                values.append(v)
    return series


def _primary(series: dict, run: Path) -> str:
    """The key of the run's training-time FD: the first of PRIMARY_FDS it records, else its first fd_* key."""
    found = [k for k in PRIMARY_FDS if k in series] or [k for k in series if k.startswith("fd_")]
    if not found:
        raise UserInputError(f"{run}: its metrics.json history has no Fréchet distance of the student")
    return found[0]


def stage_one_steps(run: Path) -> int:
    """Steps a run spent before its own training loop (DisBack's path recording), 0 for other methods."""
    index = run / "path" / "path.json"
    return json.loads(index.read_text())["steps"] if index.is_file() else 0


def _mean_std(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    """Per evaluated step: the mean and std (0 for one run) over runs."""
    values = list(zip(*curves, strict=True))
    return [statistics.mean(v) for v in values], [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]


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
        all_series = [_series(run) for run in members]
        keys = {_primary(series, run) for series, run in zip(all_series, members, strict=True)}
        if len(keys) > 1:
            raise UserInputError(f"the {method} runs record different training-time distances; judge them apart")
        key = keys.pop()
        curves = [series[key] for series in all_series]
        steps = curves[0][0]
        if any(c[0] != steps for c in curves):
            raise UserInputError(f"the {method} runs were evaluated at different steps; use one eval_every")
        offset = max(stage_one_steps(run) for run in members)
        mean, std = _mean_std([c[1] for c in curves])
        report["methods"][method] = {
            "runs": [str(r) for r in members], "stage_one_steps": offset, "steps": steps, "fd_key": key,
            "fd_mean": mean, "fd_std": std, "final_per_run": [c[1][-1] for c in curves],
            "series": {k: dict(zip(("mean", "std"), _mean_std([s[k][1] for s in all_series]), strict=True))
                       for k in all_series[0] if k != key and all(s.get(k, (None,))[0] == steps for s in all_series)}}
    primaries = {e["fd_key"] for e in report["methods"].values()}
    if len(primaries) > 1:
        raise UserInputError(f"the runs were judged in different feature spaces ({', '.join(sorted(primaries))})")
    target = report["methods"][baseline]["fd_mean"][-1]
    base_steps = report["methods"][baseline]["steps"][-1]
    report["target_fd"] = target
    for entry in report["methods"].values():
        reached = next((s for s, v in zip(entry["steps"], entry["fd_mean"], strict=True) if v <= target), None)
        entry["steps_to_target"] = None if reached is None else reached + entry["stage_one_steps"]
        entry["share_of_baseline_steps"] = None if reached is None else entry["steps_to_target"] / base_steps
    return report


def _side_keys(report: dict) -> list[str]:
    """The keys beside the training-time FD that every method's runs record (the second judge's FD, digit_acc,
    colour_balance), in a fixed order."""
    shared = set.intersection(*(set(e["series"]) for e in report["methods"].values()))
    return sorted(shared, key=lambda k: (k in SIDE_METRICS, k))


def markdown(report: dict) -> str:
    fd_key, side = next(iter(report["methods"].values()))["fd_key"], _side_keys(report)
    lines = [f"Target: the {report['baseline']} runs' mean final {fd_key} {report['target_fd']:.2f} (training-time "
             "judge). Steps include stage-1 work (DisBack's path recording, one path step = one training step).", "",
             f"| method | seeds | final {fd_key} (mean ± std) | stage-1 steps | steps to target | share of baseline "
             f"steps |{''.join(f' final {k} |' for k in side)}", "|---|---|---|---|---|---|" + "---|" * len(side)]
    for method, e in report["methods"].items():
        finals = e["final_per_run"]
        spread = f" ± {statistics.stdev(finals):.2f}" if len(finals) > 1 else ""
        share = "not reached" if e["share_of_baseline_steps"] is None else f"{100 * e['share_of_baseline_steps']:.0f}%"
        lines.append(f"| {method} | {len(finals)} | {statistics.mean(finals):.2f}{spread} | {e['stage_one_steps']} | "
                     f"{e['steps_to_target'] if e['steps_to_target'] is not None else '–'} | {share} |"
                     + "".join(f" {e['series'][k]['mean'][-1]:.4g} ± {e['series'][k]['std'][-1]:.2g} |" for k in side))
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Mean FD (band: ± std over seeds) against training steps, stage-1 work shifting a curve to the right; one panel
    more for each series every method records beside it (the second judge's FD, digit accuracy, colour balance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fd_key, side = next(iter(report["methods"].values()))["fd_key"], _side_keys(report)
    fig, axes = plt.subplots(1, 1 + len(side), figsize=(6.5 + 4.5 * len(side), 4.2), dpi=120, squeeze=False)
    for i, key in enumerate([fd_key, *side]):
        ax = axes[0][i]
        for method, e in report["methods"].items():
            x = [s + e["stage_one_steps"] for s in e["steps"]]
            mean, std = (e["fd_mean"], e["fd_std"]) if i == 0 else (e["series"][key]["mean"], e["series"][key]["std"])
            ax.plot(x, mean, marker="o", ms=3, label=f"{method} ({len(e['runs'])} seeds)")
            ax.fill_between(x, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], alpha=0.2)
        if key.startswith("fd_") or key == "fid":
            ax.set_yscale("log")
        ax.set_xlabel("training steps (incl. stage-1 path recording)")
        ax.set_ylabel(f"{key} (training-time judge, seed 1234)")
        ax.grid(alpha=0.3)
    axes[0][0].axhline(report["target_fd"], ls="--", lw=0.8, color="gray")
    axes[0][0].legend(fontsize=8)
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
