"""Teacher at K steps vs one-step students: FD on both digits judges (protocol stated), NFE, images/s, forgetting;
a Markdown table and a chart."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from onestep.bench.teacher_rows import cached_row, folder_digest
from onestep.config import reference_guidance
from onestep.errors import UserInputError
from onestep.eval.classifier import DIGITS_JUDGES
from onestep.eval.fd import frechet_distance
from onestep.eval.features import metric_key
from onestep.eval.quantize import to_uint8
from onestep.eval.sampling import balanced_labels
from onestep.models.loading import resolve_path
from onestep.runs import RUN_CONFIG
from onestep.sampling.inference import FolderSampler, load_sampler


JUDGES = ("digits", "digits_mlp")  # the two digits judges every row is scored on (onestep.eval.classifier)


def images_per_second(sampler: FolderSampler, batch: int, passes: int = 3) -> float:
    """Median throughput of sampling one batch of `batch` images, over as many batches as time at least `passes`
    network passes per image (3 batches of a one-step sampler, 1 of a 4-step teacher), after a warm-up batch (a
    small one for a multi-step sampler: its timed batch's first pass already runs at the full batch size)."""
    labels = balanced_labels(batch, sampler.num_classes) if sampler.num_classes else None
    warm = batch if sampler.nfe < passes else min(batch, 16)
    sampler.sample(labels[:warm] if labels is not None else None, warm, seed=0, batch_size=warm)
    times = []
    for _ in range(-(-passes // sampler.nfe)):
        start = time.perf_counter()
        sampler.sample(labels, batch, seed=0, batch_size=batch)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def evaluate_sampler(sampler: FolderSampler, num_samples: int, seed: int | list[int],
                     speed_batch: int | None, forget: list[int] = (), judges: tuple[str, ...] = JUDGES) -> dict:
    """The Fréchet distance of class-balanced samples in each judge's features (mean and spread over noise seeds;
    the same images for every judge), NFE, class-share error, (unless speed_batch is None) images/s and, for
    `forget` classes, the forgetting metrics on each judge (means over the seeds).

    The row's `fd`, `fd_std`, `fds`, `protocol` and `forgetting` are the first judge's; `judges` holds every one's."""
    seeds = [seed] if isinstance(seed, int) else list(seed)
    labels = balanced_labels(num_samples, sampler.num_classes) if sampler.num_classes else None
    results: dict[str, list] = {judge: [] for judge in judges}
    for s in seeds:
        images = to_uint8(sampler.sample(labels, num_samples, s))
        for judge in judges:
            results[judge].append(frechet_distance(images, reference="digits", features=judge))
    by_judge = {judge: {"fd": statistics.mean(r.value for r in rs),
                        "fd_std": statistics.stdev(r.value for r in rs) if len(rs) > 1 else None,
                        "fds": [r.value for r in rs], "protocol": rs[-1].protocol} for judge, rs in results.items()}
    row = {**by_judge[judges[0]], "judges": by_judge, "seeds": seeds, "nfe": sampler.nfe,
           "images_per_s": images_per_second(sampler, speed_batch) if speed_batch else None}
    if sampler.num_classes:
        from onestep.eval.classifier import load_judge
        from onestep.eval.sampling import class_shares

        shares = class_shares(images, load_judge(judges[0]))
        row["class_share_max_error"] = float(abs(shares - 1.0 / sampler.num_classes).max())
    if forget:
        per_seed = [forgetting_metrics(sampler, forget, num_samples, s, judges) for s in seeds]
        for judge in judges:
            by_judge[judge]["forgetting"] = {k: statistics.mean(m[judge][k] for m in per_seed)
                                             for k in per_seed[0][judge]}
        row["forgetting"] = by_judge[judges[0]]["forgetting"]
    return row


def forgetting_metrics(sampler: FolderSampler, forget: list[int], num_samples: int, seed: int,
                       judges: tuple[str, ...] = ("digits",)) -> dict[str, dict[str, float]]:
    """{judge: unlearning accuracy per forgotten class (that judge's classifier) and the Fréchet distance of the
    remaining classes (its features)} of a folder's sampler; every judge sees the same images."""
    from onestep.eval.forgetting import forgetting_report

    if not sampler.num_classes:
        raise UserInputError(f"{sampler.path} is not class-conditional: forgetting metrics need class labels")
    drawn: dict[bytes, torch.Tensor] = {}

    def sample(labels: torch.Tensor) -> torch.Tensor:
        key = labels.numpy().tobytes()
        if key not in drawn:
            drawn[key] = to_uint8(sampler.sample(labels, len(labels), seed))
        return drawn[key]

    return {judge: forgetting_report(sample, sampler.num_classes, list(forget), num_samples, features=judge,
                                     metric=metric_key(judge), classifier=judge) for judge in judges}


def teacher_report(teacher_path: Path, num_samples: int, ddim_steps: list[int], ddpm_steps: list[int],
                   guidance_scales: list[float], seed: int = 0, speed_batch: int | None = 256) -> list[dict]:
    """The teacher's FD / images/s at each (sampler, steps, guidance) combination under one protocol."""
    rows = []
    for scale in guidance_scales:
        for sampler, steps in [("ddim", k) for k in ddim_steps] + [("ddpm", k) for k in ddpm_steps]:
            folder = load_sampler(teacher_path, steps=steps, sampler=sampler, guidance_scale=scale)
            row = evaluate_sampler(folder, num_samples, seed, speed_batch)
            rows.append({"name": f"{sampler.upper()} {steps}, guidance {scale:g}", **row})
            fds = ", ".join(f"{j['protocol']['metric']} {j['fd']:.3f}" for j in row["judges"].values())
            print(f"{rows[-1]['name']}: {fds} (N={num_samples}), {_fmt(row['images_per_s'], 0)} images/s",
                  flush=True)
    return rows


def _fmt(value, digits=2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def finished_runs(runs: list[Path]) -> tuple[dict[Path, dict], Path, float]:
    """The runs' saved configs, their one shared teacher folder and the teacher rows' guidance (UserInputError when a
    folder is not a finished run or the runs distill different teachers)."""
    configs = {}
    for run in runs:
        if not (run / RUN_CONFIG).is_file() or not (run / "pipeline").is_dir():
            raise UserInputError(f"{run} is not a finished run folder (needs {RUN_CONFIG} and pipeline/)")
        configs[run] = json.loads((run / RUN_CONFIG).read_text())
    teachers = {c["teacher"]["path"] for c in configs.values()}
    if len(teachers) != 1:
        raise UserInputError(f"runs distill different teachers ({', '.join(sorted(teachers))}); bench them apart")
    return configs, resolve_path(teachers.pop()), reference_guidance(next(iter(configs.values())))


def teacher_row_protocol(steps: int, guidance: float, num_samples: int, seeds: list[int],
                         forget: list[int] = ()) -> dict:
    """Everything a teacher row of `run_benchmark` depends on besides the teacher's weights (the cache key)."""
    return {"table": "onestep bench", "sampler": "ddim", "steps": steps, "guidance_scale": guidance,
            "num_samples": num_samples, "seeds": list(seeds), "forget": list(forget), "reference": "digits",
            "judges": {judge: folder_digest(DIGITS_JUDGES[judge]) for judge in JUDGES}}


def sample_teacher_row(teacher_path: Path, protocol: dict) -> dict:
    """The teacher's row under a `teacher_row_protocol`, sampled and scored (without images/s: see run_benchmark)."""
    sampler = load_sampler(teacher_path, steps=protocol["steps"], guidance_scale=protocol["guidance_scale"])
    row = evaluate_sampler(sampler, protocol["num_samples"], protocol["seeds"], None, protocol["forget"])
    return {"name": f"teacher DDIM {protocol['steps']}", **row}


def run_benchmark(runs: list[Path], out: Path, num_samples: int = 1000, teacher_steps: list[int] = (1, 4, 10, 50),
                  speed_batch: int = 256, seeds: list[int] = (0,), forget: list[int] = (),
                  use_cache: bool = True) -> dict:
    """Evaluate the runs' exported pipelines and their shared teacher under one FD protocol; write the report.

    The teacher's rows come from the teacher-row cache when it holds them (`use_cache=False` resamples them); their
    images/s are measured here, beside the students', never cached."""
    configs, teacher_path, guidance = finished_runs(runs)
    rows = []
    for k in teacher_steps:
        protocol = teacher_row_protocol(k, guidance, num_samples, seeds, forget)
        row = cached_row(teacher_path, protocol, lambda p=protocol: sample_teacher_row(teacher_path, p),
                         "onestep bench", use_cache)
        sampler = load_sampler(teacher_path, steps=k, guidance_scale=guidance)
        rows.append({**row, "images_per_s": images_per_second(sampler, speed_batch) if speed_batch else None})
    histories = {}
    for run, cfg in configs.items():
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
        histories[run.name] = metrics.get("history", [])
        row = evaluate_sampler(load_sampler(run / "pipeline"), num_samples, seeds, speed_batch, forget)
        rows.append({"name": f"{cfg['method']} ({run.name})", **row, "train_seconds": metrics.get("train_seconds"),
                     "steps": metrics.get("step")})
    slowest = next((r for r in rows if r["name"] == f"teacher DDIM {max(teacher_steps)}"), None)
    for row in rows:
        row["speedup_vs_teacher"] = row["images_per_s"] / slowest["images_per_s"] if slowest else None
    protocol = rows[0]["protocol"]
    report = {"rows": rows, "protocol": protocol, "forget": list(forget), "machine": f"{platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}", "speed_batch": speed_batch}
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(report)
    (out / "benchmark.md").write_text(table)
    plot_history(histories, rows, out / "fd_vs_step.png")
    print(table)
    return report


def _judges(report: dict) -> list[tuple[str, str]]:
    """(judge key, metric name) of every judge in the report's rows, the first judge first."""
    return [(key, j["protocol"]["metric"]) for key, j in report["rows"][0]["judges"].items()]


def _mean_std(stats: dict) -> str:
    # three decimals: FD-digits_mlp's scale is ~10x smaller than FD-digits' (teacher ~0.12)
    return _fmt(stats["fd"], 3) + (f" ± {_fmt(stats['fd_std'], 3)}" if stats.get("fd_std") is not None else "")


def markdown_table(report: dict) -> str:
    judges = _judges(report)
    seeds = report["rows"][0]["seeds"]
    spread = f"mean ± std over noise seeds {seeds}" if len(seeds) > 1 else f"noise seed {seeds[0]}"
    protocols = "; ".join(f"{p['metric']}: features {p['features']} ({p['extractor']})"
                          for p in (j["protocol"] for j in report["rows"][0]["judges"].values()))
    p = report["protocol"]
    lines = [f"{protocols}; reference {p['reference']} (N={p['num_reference']}), N = {p['num_samples']} "
             f"class-balanced samples (the same for every judge), {spread}; images/s at batch "
             f"{report['speed_batch']} on {report['machine']}.", "",
             f"| sampler | NFE | {' | '.join(f'{name} ↓' for _, name in judges)} | images/s | speed-up vs slowest "
             "teacher | max class-share error | training |", "|---|---|" + "---|" * len(judges) + "---|---|---|---|"]
    for r in report["rows"]:
        training = (f"{r['steps']} steps, {r['train_seconds'] / 60:.1f} min" if r.get("train_seconds") else "–")
        fds = " | ".join(_mean_std(r["judges"][key]) for key, _ in judges)
        lines.append(f"| {r['name']} | {r['nfe']} | {fds} | {_fmt(r['images_per_s'], 0)} | "
                     f"{_fmt(r['speedup_vs_teacher'], 1)}x | {_fmt(r.get('class_share_max_error'), 3)} | {training} |")
    cached = [f"- {r['name']}: {r['cached']}" for r in report["rows"] if r.get("cached")]
    if cached:
        lines += ["", "Teacher rows whose Fréchet distances were read from the teacher-row cache (`onestep bench "
                  "--no-cache` resamples them; images/s are always measured now):", *cached]
    if report.get("forget"):
        lines += ["", *forgetting_table(report)]
    return "\n".join(lines) + "\n"


def forgetting_table(report: dict) -> list[str]:
    forget, judges = report["forget"], _judges(report)
    seeds = report["rows"][0]["seeds"]
    per_class = int(report["rows"][0]["forgetting"]["samples_per_forgotten_class"])
    head = " | ".join(f"classified as {c} when asked for {c}, {key} classifier ↓" for c in forget for key, _ in judges)
    lines = [f"Forgetting (classes {forget}; each judge's classifier on the same samples; {per_class} samples asked "
             f"for each forgotten class per noise seed, means over seeds {seeds}; the Fréchet distance of the "
             "remaining classes against their real digits in each judge's features):", "",
             f"| sampler | {head} | {' | '.join(f'{name} remaining classes ↓' for _, name in judges)} |",
             "|---|" + "---|" * (len(forget) * len(judges) + len(judges))]
    for r in report["rows"]:
        fs = {key: r["judges"][key]["forgetting"] for key, _ in judges}
        shares = " | ".join(f"{100 * fs[key][f'classified_as_forgotten/class_{c}']:.1f}%"
                            for c in forget for key, _ in judges)
        remaining = " | ".join(_fmt(fs[key][f"{metric_key(key)}/remaining_classes"], 3) for key, _ in judges)
        lines.append(f"| {r['name']} | {shares} | {remaining} |")
    return lines


def plot_history(histories: dict[str, list[dict]], rows: list[dict], path: Path) -> None:
    """FD against training step and against wall time for each run, with the teacher's K-step FDs as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120, sharey=True)
    for name, history in histories.items():
        # a forgetting run answers the forgotten class with other classes: its quality is on the remaining ones
        forgetting = any(k.endswith("/remaining_classes") for h in history for k in h)
        suffix = "/remaining_classes" if forgetting else "/student"
        points = [(h["step"], h["elapsed_s"] / 60, h[k]) for h in history for k in h
                  if k.endswith(suffix) and k.startswith(("fd_digits", "fid"))]
        name = f"{name} (remaining classes)" if forgetting else name
        if points:
            steps, minutes, values = zip(*points, strict=True)
            axes[0].plot(steps, values, marker="o", ms=3, label=name)
            axes[1].plot(minutes, values, marker="o", ms=3, label=name)
    for ax, xlabel in zip(axes, ("training step (critic updates)", "training wall time (minutes)"), strict=True):
        for row in rows:
            if row["name"].startswith("teacher"):
                ax.axhline(row["fd"], ls="--", lw=0.8, color="gray")
                ax.text(ax.get_xlim()[0], row["fd"], f" {row['name']}", va="bottom", fontsize=7, color="gray")
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{rows[0]['protocol']['metric']} (training-time judge, seed 1234)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def step_overhead(cfg, iterations: int = 20) -> dict:
    """Seconds per training iteration vs the sum of the network passes it makes, measured in one process.

    One iteration is run once with its network calls (generator, fake score, teacher) recorded; the benchmark then
    times (a) whole iterations as the Trainer runs them and (b) the recorded calls replayed alone, forward (and
    backward where the call was differentiable), on the same inputs. The ratio (a)/(b) is the loop's overhead.
    """
    from onestep.runs import build_distiller_task
    from onestep.training.trainer import Trainer

    task = build_distiller_task(cfg)
    trainer = Trainer(task, Path(cfg.output_dir), cfg.train)
    period = max(u.every for u in trainer.updates)
    calls: list[tuple] = []

    def recorder(fn):
        def record(*args, **kwargs):
            out = fn(*args, **kwargs)
            detached = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
            calls.append((fn, detached, kwargs, torch.is_grad_enabled() and out.requires_grad))
            return out
        return record

    networks = {"generator": task.generator, "fake": getattr(task, "fake", None)}
    originals = {}
    for name, net in networks.items():
        if net is not None:
            originals[name] = net.forward
            net.forward = recorder(net.forward)
    teacher_x0 = task.teacher.x0_with_grad
    task.teacher.x0_with_grad = recorder(teacher_x0)

    def iteration(step: int) -> None:
        for update in trainer.updates:
            if update.runs_at(step):
                trainer._run_update(update)

    for step in range(period):  # warm-up and recording: one full TTUR period
        iteration(step)
    recorded = list(calls)
    for name, net in networks.items():
        if net is not None:
            net.forward = originals[name]
    task.teacher.x0_with_grad = teacher_x0

    start = time.perf_counter()
    for step in range(iterations * period):
        iteration(step)
    per_period = (time.perf_counter() - start) / iterations

    def replay() -> None:
        for fn, args, kwargs, differentiable in recorded:
            with torch.set_grad_enabled(differentiable):
                args = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() and differentiable
                        else a for a in args]
                out = fn(*args, **kwargs)
                if differentiable:
                    out.float().sum().backward()

    replay()
    start = time.perf_counter()
    for _ in range(iterations):
        replay()
    passes = (time.perf_counter() - start) / iterations
    return {"seconds_per_iteration": per_period / period, "network_seconds_per_iteration": passes / period,
            "ratio": per_period / passes, "calls_per_period": len(recorded), "period": period,
            "batch_size": cfg.data.batch_size}
