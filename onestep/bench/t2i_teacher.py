"""The digits-t2i table (scripts/t2i_table.py, `make demo-t2i`, `make demo-flow`): one-step students against their
teacher at K guided steps of its sampler (DDIM for the miniature SD, the Euler ODE for a flow teacher such as
builtin:digits-flow), on the same prompts and noise seed, under both t2i judges.

Every row has FD-t2i (the first judge, with its digit / colour metrics) and FD-t2i_mlp (the second,
onestep.eval.t2i_classifier), each row's ratio to the teacher's most-step row under each judge, and the judges'
agreement |ratio_t2i - ratio_t2i_mlp| / ratio_t2i (issue 24's target: <= 0.15 on every published row).

A student's numbers are its run's final evaluation when that has both judges (runs of configs/t2i since the second
judge, and of configs/flow), else its exported pipeline is sampled once here and both judges score the same images.
The teacher's rows come from the teacher-row cache (onestep/bench/teacher_rows.py), one entry per judge; a miss
samples the teacher once and scores it on both judges.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from onestep.bench.teacher_rows import cache_dir, folder_digest, lookup, row_key, store
from onestep.config import RunConfig, config_from, reference_guidance, to_dict
from onestep.errors import UserInputError
from onestep.eval.judge import Judge
from onestep.eval.t2i import SECOND_JUDGE_METRIC, T2I_METRICS
from onestep.eval.t2i_classifier import T2I_JUDGES
from onestep.files import write_json_atomic
from onestep.models.loading import denoiser_folder, resolve_model
from onestep.runs import RUN_CONFIG, build_judge, load_teacher
from onestep.sampling.teacher import sampler_label


T2I_STEPS = (4, 10, 25)  # the table's default teacher steps
COLUMNS = ("fd_t2i", "digit_acc", "colour_acc", "colour_balance", "images_per_s")  # the first judge's columns
JUDGE_KEYS = {"t2i": "fd_t2i", "t2i_mlp": SECOND_JUDGE_METRIC}  # judge -> its Fréchet distance's key
AGREEMENT_TARGET = 0.15
COMMAND = "scripts/t2i_table.py"
SAMPLER_NAMES = {"ddim": "DDIM", "euler": "Euler"}  # how a row's name says it


def t2i_sampler(cfg: RunConfig) -> str:
    """The sampler of the run's teacher, as onestep.sampling.teacher.sampler_label names it, read from its folder
    without loading it: "euler" for a flow transformer, else "ddim"."""
    folder = resolve_model(cfg.teacher.path, cfg.teacher.revision)
    return "euler" if denoiser_folder(folder) == "transformer" else "ddim"


def table_config(cfg: RunConfig) -> RunConfig:
    """A run's config as the table judges it: FD-t2i with the three classifier metrics and FD-t2i_mlp, the teacher
    at the rows' guidance (eval.teacher_guidance_scale folded into teacher.guidance_scale, so that the teacher-row
    cache key is the teacher's as sampled)."""
    teacher = dataclasses.replace(cfg.teacher, guidance_scale=reference_guidance(to_dict(cfg)))
    evaluation = dataclasses.replace(cfg.eval, features="t2i", reference="digits_t2i",
                                     metrics=[*T2I_METRICS, SECOND_JUDGE_METRIC])
    return dataclasses.replace(cfg, teacher=teacher, eval=evaluation)


def t2i_teacher_protocol(cfg: RunConfig, judge: Judge, steps: int, features: str = "t2i") -> dict:
    """Everything the teacher row of one judge (`features`) depends on besides the teacher's weights (the cache key).

    The first judge's keeps the form it had before the second judge (so the shipped rows stay valid): its eval
    settings without the second judge's metric, and its classifier's digest."""
    prompts = hashlib.sha256("\n".join(judge.prompts or []).encode()).hexdigest()
    teacher = {k: v for k, v in to_dict(cfg.teacher).items() if k in ("variant", "guidance_scale", "dtype")}
    evaluation = to_dict(cfg.eval)
    evaluation.pop("teacher_guidance_scale", None)  # in the teacher's guidance_scale (table_config); keys stay stable
    if features == "t2i":
        evaluation["metrics"] = [m for m in evaluation["metrics"] if m != SECOND_JUDGE_METRIC]
    else:
        evaluation.update(features=features, metrics=[])
    folder = cfg.eval.metric_options.get(f"{features}_classifier") if features != "t2i" else None
    protocol = {"table": "scripts/t2i_table.py", "sampler": t2i_sampler(cfg), "steps": steps,
                "teacher": teacher, "eval": evaluation, "judge_seed": judge.seed, "prompts": prompts,
                "evaluator": folder_digest(Path(folder) if folder else T2I_JUDGES[features])}
    return protocol if features == "t2i" else {**protocol, "judge": features}


def _judge_rows(name: str, metrics: dict[str, float], suffix: str, protocol) -> dict[str, dict]:
    """{judge: its row} from one sampling's metrics (keys `<metric><suffix>`)."""
    first = {"name": name, **{c: metrics[f"{c}{suffix}"] for c in COLUMNS}, "protocol": protocol}
    second = {"name": name, SECOND_JUDGE_METRIC: metrics[f"{SECOND_JUDGE_METRIC}{suffix}"],
              "images_per_s": metrics[f"images_per_s{suffix}"], "protocol": protocol}
    return {"t2i": first, "t2i_mlp": second}


def t2i_teacher_rows(cfg: RunConfig, judge: Judge, steps: int) -> dict[str, dict]:
    """{judge: the teacher's row at `steps` guided steps of its sampler (DDIM, or a flow teacher's Euler ODE)}: one
    sampling, scored by both judges."""
    teacher = load_teacher(cfg)
    metrics = judge.teacher_metrics(teacher, [steps])
    sampler = sampler_label(teacher)
    return _judge_rows(f"teacher {steps} {SAMPLER_NAMES[sampler]} (cfg {teacher.guidance_scale:g})", metrics,
                       f"/teacher_{sampler}{steps}", metrics["protocol"])


def cached_t2i_teacher_row(cfg: RunConfig, judge: Judge, steps: int, use_cache: bool = True) -> dict:
    """The teacher's row at `steps` under both judges: each judge's part read from the teacher-row cache, else the
    teacher sampled once, both parts stored in the user cache."""
    teacher = resolve_model(cfg.teacher.path, cfg.teacher.revision)
    protocols = {j: t2i_teacher_protocol(cfg, judge, steps, j) for j in JUDGE_KEYS}
    hits = {j: lookup(teacher, p) for j, p in protocols.items()} if use_cache else {}
    if use_cache and all(hits.values()):
        rows = {j: {**row, "cached": source} for j, (row, source) in hits.items()}
    else:
        rows = t2i_teacher_rows(cfg, judge, steps)
        for j, row in rows.items():
            if use_cache and not hits.get(j):
                store(cache_dir() / f"{row_key(teacher, protocols[j])}.json", teacher, protocols[j], row, COMMAND)
    first, second = rows["t2i"], rows["t2i_mlp"]
    cached = {j: row["cached"] for j, row in rows.items() if row.get("cached")}
    return {**first, SECOND_JUDGE_METRIC: second[SECOND_JUDGE_METRIC], **({"cached": cached} if cached else {})}


def student_row(run: Path, cfg: RunConfig, judge: Judge) -> dict:
    """A run's one-step student under both judges: its final evaluation if it holds both, else its pipeline
    sampled here (the judge's prompts and noise seed, the pipeline's own noise draw) and scored by both."""
    name = f"{cfg.method} 1 step ({run.name})"
    final = json.loads((run / "metrics.json").read_text()).get("final", {}) if (run / "metrics.json").is_file() \
        else {}
    keys = [*COLUMNS, SECOND_JUDGE_METRIC]
    if all(f"{k}/student" in final for k in keys):
        return {"name": name, **{k: final[f"{k}/student"] for k in keys}, "source": "the run's final evaluation"}
    if not (run / "pipeline" / "model_index.json").is_file():
        raise UserInputError(f"{run}: its final evaluation lacks {SECOND_JUDGE_METRIC} and it has no exported "
                             "pipeline/ to sample (onestep export RUN)")
    from onestep.eval.metrics import SampleBatch
    from onestep.eval.quantize import to_uint8
    from onestep.sampling.inference import load_sampler

    sampler = load_sampler(run / "pipeline")
    prompts = judge.requests(judge.num_samples)[1]
    start = time.perf_counter()
    batches = (SampleBatch(to_uint8(images), None, batch_prompts) for images, _, batch_prompts in
               sampler.batches(None, judge.num_samples, judge.seed, judge.batch_size, prompts))
    values = judge.score_batches(batches, "cpu")
    values["images_per_s"] = judge.num_samples / (time.perf_counter() - start)
    return {"name": name, **{k: values[k] for k in keys},
            "source": f"re-scored: {judge.num_samples} samples of {run / 'pipeline'}, noise seed {judge.seed}"}


def add_ratios(rows: list[dict], reference: dict) -> list[dict]:
    """Each row's FD / the reference row's (the teacher at its most steps) under each judge, and the agreement."""
    for row in rows:
        ratios = {j: row[key] / reference[key] for j, key in JUDGE_KEYS.items()}
        row.update({f"ratio_{j}": r for j, r in ratios.items()})
        row["judge_disagreement"] = abs(ratios["t2i"] - ratios["t2i_mlp"]) / ratios["t2i"]
    return rows


def t2i_table(runs: list[Path], steps: list[int] = T2I_STEPS, use_cache: bool = True) -> dict:
    """The rows of the runs' students and their shared teacher at `steps`, under both judges, with ratios to the
    teacher at max(steps). The judge (prompts, noise seed, N) is the first run's."""
    configs = {}
    for run in runs:
        if not (run / RUN_CONFIG).is_file():
            raise UserInputError(f"{run} is not a run folder (needs {RUN_CONFIG})")
        configs[run] = table_config(config_from(json.loads((run / RUN_CONFIG).read_text()), label=str(run)))
    if any(c.data.name != "digits_t2i" for c in configs.values()):
        raise UserInputError("the t2i table judges students of builtin:digits-t2i or builtin:digits-flow "
                             "(data.name: digits_t2i)")
    cfg = next(iter(configs.values()))
    judge = build_judge(cfg, None, is_text=True)
    rows = [student_row(run, c, judge) for run, c in configs.items()]
    teacher_rows = [cached_t2i_teacher_row(cfg, judge, k, use_cache) for k in steps]
    reference = teacher_rows[steps.index(max(steps))]
    return {"runs": [str(r) for r in runs], "rows": add_ratios(rows + teacher_rows, reference),
            "ratio_reference": reference["name"], "agreement_target": AGREEMENT_TARGET, "protocol": judge.protocol}


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(table: dict) -> str:
    """The table in Markdown, with its protocol and where cached teacher rows were measured."""
    lines = [f"Both t2i judges on the same samples; ratios are each row's FD over {table['ratio_reference']}'s under "
             f"that judge; disagreement = |ratio_t2i - ratio_t2i_mlp| / ratio_t2i (target <= "
             f"{table['agreement_target']:.2f}). {table['protocol']}.", "",
             "| sampler | FD-t2i ↓ | ratio (t2i) | FD-t2i_mlp ↓ | ratio (t2i_mlp) | judges' disagreement | "
             "digit acc | colour acc | colour balance ↓ | images/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {r['name']} | {_fmt(r['fd_t2i'], 2)} | {_fmt(r['ratio_t2i'], 2)} | "
                     f"{_fmt(r['fd_t2i_mlp'], 4)} | {_fmt(r['ratio_t2i_mlp'], 2)} | "
                     f"{_fmt(100 * r['judge_disagreement'], 1)}% | {_fmt(r['digit_acc'])} | {_fmt(r['colour_acc'])} | "
                     f"{_fmt(r['colour_balance'])} | {_fmt(r['images_per_s'], 1)} |")
    notes = [f"- {r['name']}: {r['source']}" for r in table["rows"] if r.get("source")]
    notes += [f"- {r['name']}, {j} judge: read from the teacher-row cache ({where})"
              for r in table["rows"] for j, where in r.get("cached", {}).items()]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def is_t2i_run(run: Path) -> bool:
    """Whether a run folder holds a student trained on digits-t2i prompts (builtin:digits-t2i or builtin:digits-flow:
    its saved config's data.name)."""
    try:
        return json.loads((run / RUN_CONFIG).read_text()).get("data", {}).get("name") == "digits_t2i"
    except (OSError, ValueError, AttributeError):
        return False  # not a run folder: the digits bench says so


def run_t2i_benchmark(runs: list[Path], out: Path, steps: list[int] = T2I_STEPS, use_cache: bool = True) -> dict:
    """`onestep bench` on digits-t2i runs: the t2i table, written as OUT/benchmark.json and OUT/benchmark.md."""
    table = t2i_table(runs, list(steps), use_cache)
    text = markdown(table)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "benchmark.json", table)
    (out / "benchmark.md").write_text(text)
    print(text)
    return table
