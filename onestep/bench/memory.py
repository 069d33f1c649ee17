"""`onestep bench --suite memory CONFIG`: peak memory of training steps under the memory savers, one fresh process
per variant (full fine-tuning, gradient checkpointing, a LoRA generator, LoRA critics too).

What is measured: on CUDA, `torch.cuda.max_memory_allocated` over one TTUR period after the networks are built
(tensors only, exact); on the CPU, the process's peak resident set size (`getrusage` ru_maxrss) against its resident
size once the networks are built (allocator caches and the Python heap included, so small differences are noise).
A fresh process per variant keeps one variant's peak from hiding another's.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch


VARIANTS: dict[str, list[str]] = {
    "full": [],
    "gradient_checkpointing": ["train.gradient_checkpointing=true"],
    "lora_generator": ["options.lora.rank=4"],
    "lora_generator_and_critic": ["options.lora.rank=4", "options.lora.critic=true"],
}


def _resident_mib() -> float:
    """The current resident set size (Linux /proc; the peak is all other systems give)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, IndexError, ValueError):
        return _peak_resident_mib()


def _peak_resident_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def measure(config: Path, overrides: list[str], out: Path) -> dict:
    """Build the run's task and Trainer, then run one TTUR period of its updates (each update once at least, its
    optimizer state allocated); the memory that took."""
    from onestep.config import load_config
    from onestep.runs import build_distiller_task
    from onestep.training.trainer import Trainer

    cfg = load_config(config, [f"output_dir={out}", *overrides])
    task = build_distiller_task(cfg)
    trainer = Trainer(task, out, cfg.train)
    cuda = trainer.accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20 if cuda else _resident_mib()
    period = max(u.every for u in trainer.updates)
    for step in range(period):
        for update in trainer.updates:
            if update.runs_at(step):
                trainer._run_update(update)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_resident_mib()
    trainable = sum(p.numel() for u in trainer.updates for p in u.module.parameters() if p.requires_grad)
    return {"overrides": overrides, "measure": "cuda max_memory_allocated" if cuda else "peak RSS (ru_maxrss)",
            "built_mib": before, "peak_mib": peak, "training_mib": peak - before, "trainable_parameters": trainable,
            "batch_size": cfg.data.batch_size, "steps": period}


def run_memory_suite(config: Path, out: Path, batch_size: int | None = None) -> dict:
    """Every variant in its own process; prints the report as one JSON line and writes OUT/memory.json."""
    extra = [f"data.batch_size={batch_size}"] if batch_size else []
    rows = []
    for name, overrides in VARIANTS.items():
        cmd = [sys.executable, "-m", "onestep.bench.memory", str(config), str(out / name), *extra, *overrides]
        done = subprocess.run(cmd, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", **os.environ})
        if done.returncode != 0:
            raise RuntimeError(f"memory variant {name} failed:\n{done.stderr[-4000:]}")
        rows.append({"variant": name, **json.loads(done.stdout.strip().splitlines()[-1])})
    full = rows[0]["training_mib"]
    for row in rows:
        row["training_vs_full"] = row["training_mib"] / full if full > 0 else None
    report = {"suite": "memory", "config": str(config), "device": "cuda" if torch.cuda.is_available() else "cpu",
              "machine": f"{platform.machine()}, torch {torch.__version__}", "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    config_path, out_dir, *config_overrides = sys.argv[1:]
    print(json.dumps(measure(Path(config_path), config_overrides, Path(out_dir))))
