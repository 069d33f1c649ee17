"""`onestep bench --suite memory`: peak memory and time of real training steps under the memory savers, one fresh
process per variant.

Two forms:
- `onestep bench --suite memory CONFIG`: the config's own networks (e.g. digits), variants full / checkpointing /
  LoRA generator / LoRA generator and critics, one TTUR period each.
- `onestep bench --suite memory --shape sd15|sdxl|sd35m [--methods ...]`: real-size random-weight models
  (`onestep.models.shapes`) in `configs/<shape>/<method>.yaml` (sd35m: `configs/sd3/`) at batch 1, through the
  cumulative variants of SHAPE_VARIANTS.
  A variant whose estimate does not fit in the memory free now (or in `--max-gb`) is not run: it is estimated from
  the per-component figures of a measured variant of the same method and marked "estimated".
- `--shape flux`: FLUX.1-dev's 12 B transformer (24 GB in bf16) is never built here; every row is estimated from the
  measured SD3.5-medium reference row of the same method (`--reference` its memory.json, or measured first) by
  parameter counts on the meta device (`scaled_reference`).
  The flow shapes' T5-XXL encoders (4.76 B parameters, 8.9 GiB in bf16) are left out of the measured process: SD3's
  pipeline feeds zeros of T5's shape in their place (the transformer attends to the same 333 text tokens); the
  report gives their size separately (`left_out`).

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
# the shapes `--shape` takes and their recipes' folder under configs/ (tiny: SD1.5's recipes on a tiny UNet)
CONFIG_DIRS = {"sd15": "sd15", "sdxl": "sdxl", "tiny": "sd15", "sd35m": "sd3", "tiny_sd3": "sd3", "flux": "flux",
               "tiny_flux": "flux"}
# shapes too large to build here, and the measured shape their rows are estimated from
ESTIMATED_FROM = {"flux": "sd35m", "tiny_flux": "tiny_sd3"}
# the text tokens a flow transformer attends to: SD3's CLIP 77 beside T5's 256 (its pipeline's max_sequence_length,
# zeros without T5), FLUX's T5 512 (`onestep.pipelines.pipeline_onestep.flow_max_sequence_length`)
TEXT_TOKENS = {"SD3Transformer2DModel": 77 + 256, "FluxTransformer2DModel": 512}
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


def check_shape(shape: str) -> None:
    if shape not in CONFIG_DIRS:
        raise UserInputError(f"unknown --shape {shape!r}; choose one of {', '.join(CONFIG_DIRS)}")


def shape_methods(shape: str, configs: Path = CONFIGS) -> list[str]:
    """The methods with a recipe for `shape` (configs/<dir>/<method>.yaml), in METHODS' order."""
    return [m for m in METHODS if (configs / CONFIG_DIRS[shape] / f"{m}.yaml").is_file()]


def left_out(shape: str) -> dict[str, int]:
    """The components the measured process does without, with their parameters: a flow shape's T5 encoders (T5-XXL
    is larger than SD3.5 medium's transformer). SD3's pipeline feeds zeros of T5's shape in their place."""
    from onestep.models.shapes import component_configs, parameter_counts

    names = [n for n, config in component_configs(shape).items() if config.get("model_type") == "t5"]
    counts = parameter_counts(shape) if names else {}
    return {name: counts[name] for name in names}


def shape_overrides(shape: str, method: str, out: Path, latent_size: int | None) -> list[str]:
    """The overrides that point configs/<shape>/<method>.yaml at a random-weight teacher and batch 1."""
    from onestep.models.shapes import component_configs, latent_size_of, write_random_images, write_random_teacher

    # written in bfloat16 (random weights; each variant loads them in its teacher.dtype): an SDXL UNet built in
    # float32 alone would take 10 GB
    teacher = write_random_teacher(shape, out / f"teacher_{shape}_{latent_size or 'full'}_bf16", latent_size,
                                   dtype=torch.bfloat16, leave_out=tuple(left_out(shape)))
    vae = component_configs(shape)["vae"]
    size = (latent_size or latent_size_of(component_configs(shape))) * 2 ** (len(vae["block_out_channels"]) - 1)
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
                    latent_size: int | None = None, max_gb: float = 14.0, configs: Path = CONFIGS,
                    reference: Path | None = None) -> dict:
    """Each method at `shape`: the reference variant first (measured when it fits), then the others, each measured
    in a fresh process when its estimate fits in min(free memory - 2 GiB, max_gb), estimated otherwise. A shape of
    ESTIMATED_FROM is estimated throughout (`run_estimated_shape`)."""
    from onestep.models.shapes import component_configs, denoiser_name, latent_size_of, parameter_counts

    check_shape(shape)
    if shape in ESTIMATED_FROM:
        return run_estimated_shape(shape, out, methods, variants, reference, steps, latent_size, max_gb, configs)
    shape_configs = component_configs(shape)
    full_size = latent_size_of(shape_configs)
    # the reference's guard: 16 bytes per denoiser parameter (DMD2 LoRA measured ~16)
    unet_parameters = parameter_counts(shape)[denoiser_name(shape_configs)]
    scale = (full_size / latent_size) ** 2 if latent_size else 1.0
    rows = []
    for method in methods:
        config = configs / CONFIG_DIRS[shape] / f"{method}.yaml"
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
                        "full_latent_size": full_size, "steps": steps, "rows": rows, "left_out": left_out(shape)})


# --- flow shapes too large to build here --------------------------------------------------------------------------
def flow_counts(shape: str, config: Path) -> dict:
    """What the reference variant of `config` holds at a flow `shape`, counted on the meta device (nothing is
    allocated): the transformer's parameters; the frozen elements (parameters and buffers of the transformer, text
    encoders but the left-out T5 and VAE, held in teacher.dtype) and their parameters; the LoRA adapters of rank
    LORA_RANK one trained network gets (the config's targets); the GAN head the config trains (DMD2's
    TokenClassifier at its `gan_depths`); and the activation scale blocks x width x tokens at the full latent size
    (image tokens in 2x2 patches beside TEXT_TOKENS)."""
    from dataclasses import replace

    from onestep.config import load_config
    from onestep.models.critics import TokenClassifier, blocks_at_depths, transformer_blocks
    from onestep.models.lora import add_lora
    from onestep.models.shapes import build_component, component_configs, latent_size_of

    configs = component_configs(shape)
    skip = {"scheduler", *left_out(shape)}
    options = load_config(config).options
    with torch.device("meta"):
        built = {name: build_component(name, c) for name, c in configs.items() if name not in skip}
        transformer = built["transformer"]
        frozen = [t for module in built.values() for t in (*module.parameters(), *module.buffers())]
        frozen_parameters = sum(p.numel() for module in built.values() for p in module.parameters())
        transformer_parameters = sum(p.numel() for p in transformer.parameters())
        blocks = len(transformer_blocks(transformer))
        width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        add_lora(transformer, replace(options.lora, rank=LORA_RANK))
        adapters = sum(p.numel() for n, p in transformer.named_parameters() if "lora_" in n)
        head = 0
        if getattr(options, "gan", False):
            depths = blocks_at_depths(blocks, options.gan_depths)
            head = sum(p.numel() for p in TokenClassifier(width, len(depths)).parameters())
    tokens = (latent_size_of(configs) // 2) ** 2 + TEXT_TOKENS[configs["transformer"]["_class_name"]]
    return {"transformer": transformer_parameters, "frozen_elements": sum(t.numel() for t in frozen),
            "frozen_parameters": frozen_parameters, "adapters": adapters, "head": head,
            "activation_scale": blocks * width * tokens}


def scaled_reference(reference: dict, source: dict, target: dict) -> dict:
    """A reference row of another flow shape estimated from a measured one of the same method (`flow_counts` of
    both): frozen weights in the reference's bytes per element (2: bf16); per trained network its LoRA adapters,
    plus the GAN head where the reference trained more than its adapters, float32; gradients, optimizer state and
    EMA in the reference's bytes per trained parameter; activations x target / source `activation_scale` (with
    gradient checkpointing the saved activations are each block's input tokens, blocks x width x tokens: an
    assumption, not a measurement)."""
    ref_trained = reference["trainable_parameters"]
    trained = {name: target["adapters"] + (target["head"] if n > reference["lora_parameters"][name] else 0)
               for name, n in ref_trained.items()}
    frozen_bytes = 2 if reference["half_parameters"] else 4  # the teacher's dtype: bf16 or float32
    generator = trained.get("generator", 0) / max(ref_trained.get("generator", 0), 1)
    ema = reference["ema_mib"] * generator
    weights = (reference["weights_mib"] - reference["ema_mib"]
               + (target["frozen_elements"] - source["frozen_elements"]) * frozen_bytes / MIB
               + (sum(trained.values()) - sum(ref_trained.values())) * 4 / MIB + ema)
    base = target["transformer"] - source["transformer"]
    row = {"weights_mib": weights, "ema_mib": ema,
           "gradients_mib": reference["gradients_mib"] * max(trained.values()) / max(ref_trained.values()),
           "optimizer_mib": reference["optimizer_mib"] * sum(trained.values()) / sum(ref_trained.values()),
           "activations_mib": reference["activations_mib"] * target["activation_scale"] / source["activation_scale"],
           "trainable_parameters": trained, "lora_parameters": {n: target["adapters"] for n in trained},
           "update_parameters": {n: reference["update_parameters"][n] + base + trained[n] - ref_trained[n]
                                 for n in trained},
           "shared_parameters": {n: v + base if v else 0 for n, v in reference.get("shared_parameters", {}).items()},
           "half_parameters": reference["half_parameters"] + target["frozen_parameters"] - source["frozen_parameters"]
           if reference["half_parameters"] else 0,
           "teacher_unet_mib": reference["teacher_unet_mib"] * target["transformer"] / source["transformer"]}
    row["accelerator_peak_mib"] = sum(row[k] for k in ("weights_mib", "gradients_mib", "optimizer_mib",
                                                       "activations_mib"))
    return row


def run_estimated_shape(shape: str, out: Path, methods: list[str], variants: list[str], reference: Path | None,
                        steps: int, latent_size: int | None, max_gb: float, configs: Path = CONFIGS) -> dict:
    """Every row of `shape` estimated from the measured reference rows of ESTIMATED_FROM[shape]: read from
    `reference` (that shape's memory.json) or measured first into OUT/<that shape>."""
    source = ESTIMATED_FROM[shape]
    if reference is not None:
        from onestep.files import read_json

        report = read_json(reference)
        if report.get("shape") != source:
            raise UserInputError(f"--reference {reference} is a memory report of shape {report.get('shape')!r}; "
                                 f"{shape} is estimated from a {source} report")
    else:
        report = run_shape_suite(source, out / source, methods, [REFERENCE], steps, latent_size, max_gb, configs)
    rows = []
    for method in methods:
        config = configs / CONFIG_DIRS[shape] / f"{method}.yaml"
        if not config.is_file():
            raise UserInputError(f"no config {config} for method {method}")
        measured = [r for r in report["rows"] if r["method"] == method and r["variant"] == REFERENCE
                    and r["status"].startswith("measured")]
        if not measured:
            rows.append({"method": method, "variant": REFERENCE, "overrides": SHAPE_VARIANTS[REFERENCE],
                         "status": f"not estimated: no measured {source} {REFERENCE} row of {method}"})
            continue
        source_counts = flow_counts(source, configs / CONFIG_DIRS[source] / f"{method}.yaml")
        target_counts = flow_counts(shape, config)
        ref = scaled_reference(measured[0], source_counts, target_counts)
        ratio = target_counts["activation_scale"] / source_counts["activation_scale"]
        status = (f"estimated from {source} (not built: parameter counts on the meta device, activations x{ratio:.2f} "
                  f"by blocks x width x tokens)")
        for name in [REFERENCE, *[v for v in variants if v != REFERENCE]]:
            overrides = SHAPE_VARIANTS[name]
            if method == "boot":
                overrides = [o for o in overrides if "critic" not in o]
            row = ref if name == REFERENCE else estimate(ref, overrides)
            rows.append({"method": method, "variant": name, "overrides": SHAPE_VARIANTS[name], "status": status,
                         **row})
    return _write(out, {"suite": "memory", "shape": shape, "estimated_from": source,
                        "reference": str(reference or out / source / "memory.json"),
                        "latent_size": report["latent_size"], "full_latent_size": report["full_latent_size"],
                        "steps": report["steps"], "rows": rows, "left_out": left_out(shape)})


def markdown(report: dict) -> str:
    """The shape suite's table."""
    lines = ["| method | variant | status | peak (GiB) | weights | gradients | optimizer | activations | s / step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["status"] == "failed":
            lines.append(f"| {r['method']} | {r['variant']} | failed: {r['error'][:60]} | | | | | | |")
            continue
        if "accelerator_peak_mib" not in r:
            lines.append(f"| {r['method']} | {r['variant']} | {r['status']} | | | | | | |")
            continue
        gib = [r.get(k, 0) / 1024 for k in ("accelerator_peak_mib", "weights_mib", "gradients_mib", "optimizer_mib",
                                            "activations_mib")]
        speed = f"{r['seconds_per_step']:.0f}" if "seconds_per_step" in r else ""
        lines.append(f"| {r['method']} | {r['variant']} | {r['status']} | " + " | ".join(f"{g:.1f}" for g in gib)
                     + f" | {speed} |")
    lines += [f"\n{name} ({n / 1e9:.2f} B parameters, {2 * n / 2**30:.1f} GiB in bf16) is not in these rows: add it "
              f"where prompts are encoded on the same device" for name, n in report.get("left_out", {}).items()]
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
