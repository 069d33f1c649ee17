"""`onestep bench --suite scaling CONFIG`: training throughput of 1 process against N processes (DDP through
`torch.distributed.run`), each process with the config's own batch, so N processes train on an N times larger
global batch per step (weak scaling). Efficiency = throughput_N / (N x throughput_1).

Each run is a real `onestep train` of a few steps in its own fresh folder under OUT. Its samples/s come from the
training log: global samples between the first log record at or after `warmup` steps and the last one, over the
wall time between them, so that start-up, compilation of kernels and the final evaluation and export are not counted.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from onestep.config import load_config
from onestep.errors import UserInputError


def launch_training(config: Path, run_dir: Path, processes: int, steps: int, log_every: int) -> None:
    """`onestep train` for `steps` steps under `processes` processes (CPU machines: gloo, ACCELERATE_USE_CPU)."""
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "onestep.cli", "train", str(config), f"output_dir={run_dir}", f"train.max_steps={steps}",
           "train.max_minutes=null", f"train.log_every={log_every}", "train.eval_every=0", "train.sample_every=0",
           "train.checkpoint_every=0", "eval.num_samples=100"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training with {processes} processes failed:\n{done.stderr[-4000:]}")


def throughput(run_dir: Path, global_batch: int, warmup: int) -> dict:
    """Samples/s and s/step between the first log record at step >= warmup and the last one."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    timed = [r for r in records if "elapsed_s" in r and "event" not in r and r["step"] >= warmup]
    if len(timed) < 2:
        raise UserInputError(f"{run_dir}: fewer than two log records after {warmup} warm-up steps; train longer")
    steps = timed[-1]["step"] - timed[0]["step"]
    seconds = timed[-1]["elapsed_s"] - timed[0]["elapsed_s"]
    return {"timed_steps": steps, "seconds_per_step": seconds / steps, "samples_per_s": steps * global_batch / seconds}


def run_scaling_suite(config: Path, out: Path, processes: list[int], steps: int = 30, warmup: int = 5) -> dict:
    """Train `config` under each process count, report samples/s and the scaling efficiency against 1 process."""
    cfg = load_config(config)
    if 1 not in processes:
        processes = [1, *processes]
    rows = []
    for n in processes:
        run_dir = out / f"processes_{n}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: the log must hold this run's records only
        launch_training(config, run_dir, n, steps, log_every=warmup)
        rows.append({"processes": n, "global_batch": cfg.data.batch_size * n,
                     **throughput(run_dir, cfg.data.batch_size * n, warmup)})
    single = rows[0]["samples_per_s"]
    for row in rows:
        row["efficiency"] = row["samples_per_s"] / (row["processes"] * single)
    report = {"suite": "scaling", "config": str(config), "method": cfg.method,
              "batch_per_process": cfg.data.batch_size, "steps": steps, "warmup_steps": warmup,
              "device": "cuda" if torch.cuda.is_available() else "cpu",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
                         f"{os.environ.get('OMP_NUM_THREADS', '1 (set by the bench)')}, torch {torch.__version__}",
              "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return report
