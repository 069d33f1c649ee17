"""`onestep bench --suite memory`: peak memory and time of real training steps under the memory savers, one fresh
process per variant.

Two forms:
- `onestep bench --suite memory CONFIG`: the config's own networks (e.g. digits), variants full / checkpointing /
  LoRA generator / LoRA generator and critics, one TTUR period each.
- `onestep bench --suite memory --shape sd15|sdxl [--methods ...]`: real-size random-weight models
  (`onestep.models.shapes`) in `configs/<shape>/<method>.yaml` at batch 1, through the cumulative variants of
  SHAPE_VARIANTS.
  A variant whose estimate does not fit in the memory free now (or in `--max-gb`) is not run: it is estimated from
  the per-component figures of a measured variant of the same method and marked "estimated".

What is measured: on CUDA, `torch.cuda.max_memory_allocated` over the training steps (tensors only, exact); on the
CPU, the peak resident set size over the training steps (`VmHWM`, reset after the networks are built through
/proc/self/clear_refs; allocator caches and the Python heap included). The split: weights (every parameter and buffer
of the task's networks, EMA copies included), gradients (the largest update's trainable parameters), optimizer state
(the tensors in the optimizers' state) and activations (the rest of the peak over the memory held when built: the
activations, autograd's saved tensors and allocator slack).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from onestep.errors import UserInputError


MIB = 2**20
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "gradient_checkpointing": ["train.gradient_checkpointing=true"],
    "lora_generator": ["options.lora.rank=4"],
    "lora_generator_and_critic": ["options.lora.rank=4", "options.lora.critic=true"],
}
METHODS = ("dmd2", "sid", "sfd", "msd", "disback", "boot")
LORA_RANK = 64  # DMD2's SDXL LoRA rank
_BF16 = ["teacher.dtype=bfloat16", "train.mixed_precision=bf16"]
_CKPT = [*_BF16, "train.gradient_checkpointing=true"]
_LORA = [*_CKPT, f"options.lora.rank={LORA_RANK}", "options.lora.critic=true"]
_8BIT = ["options.generator_optimizer.use_8bit=true", "options.critic_optimizer.use_8bit=true"]
# cumulative, as in the issue: each row adds one saver; "8bit" is the full fine-tune of the 24 GB recipe
SHAPE_VARIANTS: dict[str, list[str]] = {
    "fp32": ["teacher.dtype=float32", "train.mixed_precision=no"],
    "bf16_teacher": _BF16,
    "bf16_ckpt": _CKPT,
    "bf16_ckpt_lora": _LORA,
    "bf16_ckpt_8bit": [*_CKPT, *_8BIT],
    "bf16_ckpt_lora_offload": [*_LORA, "teacher.offload=true", "options.lora.share_base=false"],
}
CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the repository's (benchmarks run from a checkout)
# per method: the run the others are estimated from (it fits in ~14 GB at SD1.5 size)
REFERENCE = "bf16_ckpt_lora"


def _status_kib(field: str) -> int | None:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()) if sys.platform == "linux" \
        else None
    return int(match.group(1)) if match else None


def _resident_mib() -> float:
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else _peak_resident_mib()


def _reset_peak() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0); False where it cannot be, and the peak then spans the build."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_resident_mib() -> float:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _tensor_mib(tensors) -> float:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / MIB


def split(trainer) -> dict:
    """Weights / gradients / optimizer state held by a Trainer's task (MiB), and the parameter counts behind them."""
    from onestep.models.networks import reachable_modules

    networks = reachable_modules(trainer.task)
    weights = [t for net in networks for t in (*net.parameters(), *net.buffers())]
    ema = [t for ema, _ in trainer.emas.values() for t in ema.shadow_params]
    state = [v for opt in trainer.optimizers.values() for s in opt.state.values() for v in s.values()]
    trainable = {u.name: [p for p in u.module.parameters() if p.requires_grad] for u in trainer.updates}
    on_cpu = [p for net in networks for p in net.parameters()
              if getattr(net, "execution_device", None) is not None]  # an offloaded teacher's weights stay in RAM
    teacher = getattr(trainer.task, "teacher", None)
    return {"weights_mib": _tensor_mib(weights) + _tensor_mib(ema), "ema_mib": _tensor_mib(ema),
            "teacher_unet_mib": _tensor_mib(teacher.unet.parameters()) if teacher is not None else 0.0,
            "offloaded_mib": _tensor_mib(on_cpu),
            "gradients_mib": max(_tensor_mib(ps) for ps in trainable.values()),
            "optimizer_mib": _tensor_mib(state),
            "trainable_parameters": {name: sum(p.numel() for p in ps) for name, ps in trainable.items()},
            "update_parameters": {u.name: sum(p.numel() for p in u.module.parameters()) for u in trainer.updates},
            "lora_parameters": {u.name: sum(p.numel() for n, p in u.module.named_parameters() if "lora_" in n)
                                for u in trainer.updates},
            "half_parameters": sum({id(p): p.numel() for net in networks for p in net.parameters()
                                    if p.dtype in (torch.bfloat16, torch.float16)}.values()),
            "shared_parameters": _shared_parameters(trainer, networks)}


def _shared_parameters(trainer, networks) -> dict[str, int]:
    """Per update, the parameters its network shares with a frozen one (`options.lora.share_base`: the teacher's)."""
    trained = [u.module for u in trainer.updates]
    frozen = {id(p) for net in networks if not any(net is t for t in trained) for p in net.parameters()}
    return {u.name: sum(p.numel() for p in u.module.parameters() if id(p) in frozen) for u in trainer.updates}


def _make_resident(trainer) -> None:
    """Copy every weight into process memory. Weights loaded in their file's dtype stay memory-mapped (safetensors):
    their pages count in the resident set only once touched, i.e. in the middle of the training steps, where they
    would pass for activations."""
    from onestep.models.networks import reachable_modules

    seen = set()
    for net in reachable_modules(trainer.task):
        for t in (*net.parameters(), *net.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                t.data = t.data.clone()


def measure(config: Path, overrides: list[str], out: Path, steps: int | None = None) -> dict:
    """Build the run's task and Trainer, then run its updates: one TTUR period (each update once at least, its
    optimizer state allocated), or `steps` rounds of every update; the memory and time that took."""
    from onestep.config import load_config
    from onestep.runs import build_distiller_task
    from onestep.training.trainer import Trainer

    cfg = load_config(config, [f"output_dir={out}", *overrides])
    start = time.perf_counter()
    task = build_distiller_task(cfg)
    trainer = Trainer(task, out, cfg.train)
    build_s = time.perf_counter() - start
    cuda = trainer.accelerator.device.type == "cuda"
    if not cuda:
        _make_resident(trainer)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / MIB if cuda else _resident_mib()
    peak_spans_build = not cuda and not _reset_peak()
    seconds: dict[str, list[float]] = {u.name: [] for u in trainer.updates}
    rounds = steps or max(u.every for u in trainer.updates)
    for step in range(rounds):
        for update in trainer.updates:
            if steps or update.runs_at(step):
                if cuda:
                    torch.cuda.synchronize()
                tick = time.perf_counter()
                trainer._run_update(update)
                if cuda:
                    torch.cuda.synchronize()
                seconds[update.name].append(time.perf_counter() - tick)
    peak = torch.cuda.max_memory_allocated() / MIB if cuda else _peak_resident_mib()
    parts = split(trainer)
    # the first call of each update is a warm-up (kernel selection, lazy allocations) when there are others
    per_update = {name: sum(s[1:]) / len(s[1:]) if len(s) > 1 else s[0] for name, s in seconds.items() if s}
    return {"overrides": overrides, "measure": "cuda max_memory_allocated" if cuda else "peak RSS (VmHWM)",
            "built_mib": before, "peak_mib": peak, "training_mib": peak - before,
            "peak_spans_build": peak_spans_build, **parts,
            "activations_mib": max(peak - before - parts["gradients_mib"] - parts["optimizer_mib"], 0.0),
            "seconds_per_update": per_update, "seconds_per_step": sum(per_update.values()), "build_s": build_s,
            "batch_size": cfg.data.batch_size, "steps": rounds,
            "latent_size": task.teacher.sample_shape[-1], "torch_threads": torch.get_num_threads()}


def _run_variant(config: Path, out: Path, overrides: list[str], steps: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "onestep.bench.memory", str(config), str(out), *overrides]
    if steps:
        cmd.append(f"--steps={steps}")
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory variant {out.name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_memory_suite(config: Path, out: Path, batch_size: int | None = None) -> dict:
    """Every variant of a config in its own process; prints the report as one JSON line, writes OUT/memory.json."""
    extra = [f"data.batch_size={batch_size}"] if batch_size else []
    rows = []
    for name, overrides in VARIANTS.items():
        rows.append({"variant": name, **_run_variant(config, out / name, [*extra, *overrides])})
    full = rows[0]["training_mib"]
    for row in rows:
        row["training_vs_full"] = row["training_mib"] / full if full > 0 else None
    return _write(out, {"suite": "memory", "config": str(config), "rows": rows})


def _write(out: Path, report: dict) -> dict:
    report = {**report, "device": "cuda" if torch.cuda.is_available() else "cpu",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return report


# --- real-size shapes ------------------------------------------------------------------------------------------
def estimate(reference: dict, overrides: list[str], latent_scale: float = 1.0) -> dict:
    """A variant's memory from a measured reference run of the same method (per component, MiB; on an accelerator:
    the process baseline of a CPU run is left out).

    Weights: the reference's, with the half-precision teacher at 4 bytes per parameter for a float32 teacher, without
    the LoRA adapters and with a full float32 EMA copy when the variant trains every weight, and with float32 copies
    of the bases the reference shared with the teacher (`shared_parameters`) when the variant trains every weight or
    does not share them (`options.lora.share_base=false`). Gradients: 4 bytes per
    trainable parameter of the largest update. Optimizer: AdamW's two float32 moments (8 bytes per parameter) or
    bitsandbytes' two 8-bit moments (2 bytes). Activations: the reference's times `latent_scale` (the latent area
    ratio), x2 in float32 compute, x`NO_CHECKPOINT_FACTOR` without gradient checkpointing. Teacher offload: minus
    the teacher's weights (they come back for each teacher call; the saving is an upper bound).
    """
    lora = any(o.startswith("options.lora.rank=") and not o.endswith("=0") for o in overrides)
    fp32_teacher = "teacher.dtype=float32" in overrides
    ckpt = "train.gradient_checkpointing=true" in overrides
    eight_bit = any("use_8bit=true" in o for o in overrides)
    adapters = reference.get("lora_parameters", reference["trainable_parameters"])  # a GAN head trains either way
    full = {n: reference["update_parameters"][n] - adapters[n] for n in adapters}
    trainable = reference["trainable_parameters"] if lora else full
    weights = reference["weights_mib"] - reference["ema_mib"]
    if fp32_teacher:
        weights += reference["half_parameters"] * 2 / MIB
    if not lora:
        weights -= sum(adapters.values()) * 4 / MIB
    if not lora or "options.lora.share_base=false" in overrides:
        weights += sum(reference.get("shared_parameters", {}).values()) * 4 / MIB
    ema = reference["ema_mib"] if lora or not reference["ema_mib"] else reference["ema_mib"] / max(
        adapters.get("generator", 1), 1) * full.get("generator", 0)
    activations = reference["activations_mib"] * latent_scale * (2 if "train.mixed_precision=no" in overrides else 1)
    if not ckpt:
        activations *= NO_CHECKPOINT_FACTOR
    if "teacher.offload=true" in overrides:
        weights -= reference["teacher_unet_mib"]
    row = {"weights_mib": weights + ema, "ema_mib": ema,
           "gradients_mib": max(trainable.values()) * 4 / MIB,
           "optimizer_mib": sum(trainable.values()) * (2 if eight_bit else 8) / MIB,
           "activations_mib": activations, "trainable_parameters": trainable}
    row["accelerator_peak_mib"] = sum(row[k] for k in ("weights_mib", "gradients_mib", "optimizer_mib",
                                                       "activations_mib"))
    return row


# activation memory without / with gradient checkpointing (measured on DMD2 SD1.5 LoRA, docs/memory.md)
NO_CHECKPOINT_FACTOR = 3.0


def _wait_for_free(mib: float, patience_s: float = 600.0) -> bool:
    """Whether `mib` of memory is (or within `patience_s` becomes) available: the machine may be shared."""
    import psutil

    deadline = time.monotonic() + patience_s
    while psutil.virtual_memory().available / MIB < mib:
        if time.monotonic() > deadline:
            return False
        time.sleep(15)
    return True


def shape_overrides(shape: str, method: str, out: Path, latent_size: int | None) -> list[str]:
    """The overrides that point configs/<shape>/<method>.yaml at a random-weight teacher and batch 1."""
    from onestep.models.shapes import write_random_images, write_random_teacher

    # written in bfloat16 (random weights; each variant loads them in its teacher.dtype): an SDXL UNet built in
    # float32 alone would take 10 GB
    teacher = write_random_teacher(shape, out / f"teacher_{shape}_{latent_size or 'full'}_bf16", latent_size,
                                   dtype=torch.bfloat16)
    size = 8 * (latent_size or json.loads((teacher / "unet" / "config.json").read_text())["sample_size"])
    prompts = out / "prompts.txt"
    # enough distinct prompts for MSD's text partition into its students
    prompts.write_text("".join(f"a photo of a {c} {n}\n" for c in ("red", "blue", "green", "black")
                               for n in ("cat", "car", "house", "tree")))
    overrides = [f"teacher.path={teacher}", "teacher.variant=null",  # the random teacher has the default weights only
                 f"data.prompts={prompts}", "data.batch_size=1", "eval.num_samples=1",
                 f"eval.prompts={prompts}", "eval.features=none", "eval.metrics=[]",  # no judge: it is not trained
                 "data.num_workers=0"]  # loader workers are other processes: their memory would go unmeasured
    if method in ("dmd2", "disback"):
        images = write_random_images(out / f"images_{size}", size)
        overrides.append(f"data.image_dir={images}")
    if method == "msd":  # one student's memory: the students train one after another (or on separate machines)
        overrides += ["options.student=0", "data.name=prompts"]  # gan: false in its recipe, so no images
    if method == "disback":  # its stage 1 records a degradation path; two one-step checkpoints keep that short
        overrides += ["options.num_checkpoints=2", "options.steps_per_checkpoint=1"]
    return overrides


def run_shape_suite(shape: str, out: Path, methods: list[str], variants: list[str], steps: int = 2,
                    latent_size: int | None = None, max_gb: float = 14.0, configs: Path = CONFIGS) -> dict:
    """Each method at `shape`: the reference variant first (measured when it fits), then the others, each measured
    in a fresh process when its estimate fits in min(free memory - 2 GiB, max_gb), estimated otherwise."""
    from onestep.models.shapes import component_configs, parameter_counts

    full_size = component_configs(shape)["unet"]["sample_size"]
    unet_parameters = parameter_counts(shape)["unet"]  # the reference's guard: 16 bytes each (DMD2 LoRA measured ~16)
    scale = (full_size / latent_size) ** 2 if latent_size else 1.0
    rows = []
    for method in methods:
        config = configs / ("sd15" if shape == "tiny" else shape) / f"{method}.yaml"  # tiny: SD1.5's recipes
        if not config.is_file():
            raise UserInputError(f"no config {config} for method {method}")
        base = shape_overrides(shape, method, out, latent_size)
        reference = None
        for name in [REFERENCE, *[v for v in variants if v != REFERENCE]]:
            overrides = [*base, *SHAPE_VARIANTS[name]]
            row = {"method": method, "variant": name, "overrides": SHAPE_VARIANTS[name]}
            if method == "boot":  # no critic
                overrides = [o for o in overrides if "critic" not in o]
            # the reference needs ~16 bytes per UNet parameter free; another variant its estimate (plus the baseline)
            need = min(max_gb * 1024, 16 * unet_parameters / MIB) if reference is None else \
                estimate(reference, overrides)["accelerator_peak_mib"] + reference["baseline_mib"]
            missing = any("use_8bit=true" in o for o in overrides) and importlib.util.find_spec("bitsandbytes") is None
            if missing and reference is not None:
                rows.append({**row, "status": "estimated (bitsandbytes not installed)",
                             **estimate(reference, overrides)})
            elif need <= max_gb * 1024 and _wait_for_free(need + 2048):
                try:
                    measured = _run_variant(config, out / method / name, overrides, steps)
                except RuntimeError as err:
                    rows.append({**row, "status": "failed", "error": str(err).splitlines()[-1]})
                    if reference is None:
                        break  # nothing to estimate the other variants from
                    continue
                measured["baseline_mib"] = measured["built_mib"] - measured["weights_mib"]
                measured["accelerator_peak_mib"] = measured["peak_mib"] - measured["baseline_mib"]
                measured["activations_mib"] *= scale
                measured["accelerator_peak_mib"] += measured["activations_mib"] * (1 - 1 / scale)
                rows.append({**row, "status": "measured" if scale == 1 else "measured, activations scaled",
                             **measured})
                if name == REFERENCE:
                    reference = measured
            elif reference is not None:
                rows.append({**row, "status": "estimated", **estimate(reference, overrides)})
            if reference is None:
                break  # nothing to estimate the other variants from
    return _write(out, {"suite": "memory", "shape": shape, "latent_size": latent_size or full_size,
                        "full_latent_size": full_size, "steps": steps, "rows": rows})


def markdown(report: dict) -> str:
    """The shape suite's table."""
    lines = ["| method | variant | status | peak (GiB) | weights | gradients | optimizer | activations | s / step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["status"] == "failed":
            lines.append(f"| {r['method']} | {r['variant']} | failed: {r['error'][:60]} | | | | | | |")
            continue
        gib = [r.get(k, 0) / 1024 for k in ("accelerator_peak_mib", "weights_mib", "gradients_mib", "optimizer_mib",
                                            "activations_mib")]
        speed = f"{r['seconds_per_step']:.0f}" if "seconds_per_step" in r else ""
        lines.append(f"| {r['method']} | {r['variant']} | {r['status']} | " + " | ".join(f"{g:.1f}" for g in gib)
                     + f" | {speed} |")
    return "\n".join(lines) + "\n"


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m onestep.bench.memory")
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(json.dumps(measure(Path(args.config), args.overrides, Path(args.out), args.steps)))


if __name__ == "__main__":
    _main(sys.argv[1:])
