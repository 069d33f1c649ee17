"""`scripts/gpu_check.sh`: what one GPU does with onestep, in one Markdown report, without downloads.

Sections: the environment; the attention kernel each backend actually runs (torch profiler); bf16 DMD2 at SD1.5 shape
per memory variant (s/step, peak memory: `onestep.bench.memory`); the digits demo trained for a fixed time with its
FD-digits; one-step images/s against the teacher's 50 steps. `--dry-run` runs the same code on the CPU at tiny sizes
(the `tiny` shape, a few seconds of training), so the script works the first time a GPU is there.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


DIGITS_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits" / "dmd2.yaml"
GPU_VARIANTS = ["bf16_teacher", "bf16_ckpt", "bf16_ckpt_lora", "bf16_ckpt_8bit", "bf16_ckpt_lora_offload"]
DRY_VARIANTS = ["bf16_ckpt_lora", "bf16_ckpt_8bit"]  # measured, then estimated: both code paths, one process
# kernels whose names say which SDPA path ran (CUDA kernel or CPU aten op names)
KERNEL_WORDS = ("flash", "efficient", "cutlass", "fmha", "xformers", "math", "softmax", "bmm", "cudnn")


def environment() -> list[str]:
    rows = [f"- python {platform.python_version()}, {platform.machine()}, torch {torch.__version__}"]
    for package in ("diffusers", "accelerate", "transformers", "peft", "xformers", "bitsandbytes"):
        try:
            rows.append(f"- {package} {version(package)}")
        except PackageNotFoundError:
            rows.append(f"- {package}: not installed")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rows.append(f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
                    f"bf16 {torch.cuda.is_bf16_supported()}")
    else:
        rows.append("- no CUDA device: CPU")
    return rows


def attention_kernels(device: str) -> list[str]:
    """Per backend: the profiler's attention-looking kernels of one forward of an attention UNet."""
    from torch.profiler import ProfilerActivity, profile

    from onestep.bench.attention import attention_unet
    from onestep.models.attention import BACKENDS, set_attention_backend

    model = attention_unet().to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    t = torch.tensor([10, 500], device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    rows = ["| backend | runs as | attention kernels seen (profiler) |", "|---|---|---|"]
    for backend in BACKENDS:
        try:
            used = set_attention_backend(model, backend)
        except Exception as err:  # a backend this machine lacks (xformers): say so, check the rest
            rows.append(f"| {backend} | unavailable | {str(err).splitlines()[0][:80]} |")
            continue
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16), profile(activities=activities) as prof:
            model(x, t)
        names = sorted({e.key for e in prof.key_averages() if any(w in e.key.lower() for w in KERNEL_WORDS)})
        rows.append(f"| {backend} | {used} | {', '.join(f'`{n[:70]}`' for n in names[:6]) or '-'} |")
    return rows


def memory_rows(out: Path, dry_run: bool) -> list[str]:
    """bf16 DMD2 at SD1.5 shape (tiny in a dry run), every GPU variant in a fresh process."""
    from onestep.bench.memory import markdown, run_shape_suite

    report = run_shape_suite("tiny" if dry_run else "sd15", out / "memory", ["dmd2"],
                             DRY_VARIANTS if dry_run else GPU_VARIANTS, steps=1 if dry_run else 3,
                             max_gb=1e6 if torch.cuda.is_available() else 14.0)
    return markdown(report).splitlines()


def digits_demo(out: Path, minutes: float, dry_run: bool) -> list[str]:
    """The digits DMD2 demo for `minutes` of training, its FD-digits from the run's metrics.json."""
    run = out / "digits_dmd2"
    limits = ["train.max_steps=2", "eval.num_samples=100"] if dry_run else [f"train.max_minutes={minutes}"]
    cmd = [sys.executable, "-m", "onestep.cli", "train", str(DIGITS_CONFIG), f"output_dir={run}", *limits]
    shutil.rmtree(run, ignore_errors=True)  # its own scratch run (`--overwrite` would keep the old one aside)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return [f"digits demo failed: `{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else '?'}`"]
    metrics = json.loads((run / "metrics.json").read_text())
    final = metrics.get("final", metrics)
    fd = {k: v for k, v in final.items() if k.lower().startswith("fd") and isinstance(v, (int, float))}
    fd["protocol"] = final.get("protocol")
    return [f"- `{' '.join(cmd[1:])}`: {metrics.get('step')} steps, {time.perf_counter() - start:.0f} s wall "
            f"(including start, evaluation, export)", f"- {json.dumps(fd)}"]


def images_per_second_rows(out: Path, dry_run: bool) -> list[str]:
    """The demo's one-step student against its teacher at 50 DDIM steps (digits, batch 256; 16 in a dry run)."""
    from onestep.bench.compare import images_per_second
    from onestep.sampling.inference import load_sampler

    pipeline = out / "digits_dmd2" / "pipeline"
    if not (pipeline / "model_index.json").is_file():
        return ["- no exported student (the demo failed)"]
    batch = 16 if dry_run else 256
    student = images_per_second(load_sampler(pipeline), batch)
    teacher = images_per_second(load_sampler("builtin:digits", steps=50), batch)
    return [f"- batch {batch}: one-step student {student:.1f} images/s, teacher 50 DDIM steps {teacher:.1f} images/s "
            f"({student / teacher:.1f}x)"]


def run(out: Path, dry_run: bool, demo_minutes: float = 2.0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sections = {"Environment": environment, "Attention kernels per backend": lambda: attention_kernels(device),
                "bf16 DMD2 at SD1.5 shape, batch 1" + (" (dry run: tiny shape)" if dry_run else ""):
                    lambda: memory_rows(out, dry_run),
                f"Digits DMD2 demo ({'2 steps' if dry_run else f'{demo_minutes:g} min'})":
                    lambda: digits_demo(out, demo_minutes, dry_run),
                "One step vs the teacher's 50": lambda: images_per_second_rows(out, dry_run)}
    lines = [f"# onestep GPU check{' (dry run, CPU)' if dry_run else ''}", ""]
    for title, section in sections.items():
        start = time.perf_counter()
        try:
            body = section()
        except Exception as err:  # one failing section must not hide the others' results
            body = [f"FAILED: `{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}`"]
        lines += [f"## {title}", "", *body, "", f"_{time.perf_counter() - start:.0f} s_", ""]
        (out / "gpu_check.md").write_text("\n".join(lines))  # a partial report survives a timeout
    return out / "gpu_check.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh")
    parser.add_argument("--out", default="runs/gpu_check")
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes")
    parser.add_argument("--demo-minutes", type=float, default=2.0)
    args = parser.parse_args(argv)
    print(run(Path(args.out), args.dry_run, args.demo_minutes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
