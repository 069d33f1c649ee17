"""Crash campaigns. By default, kill -9 on the text path: `onestep train configs/t2i/dmd2.yaml` on a captioned image
folder with `data.latent_cache` and the GAN term on (so training reads the cache), killed with SIGKILL at random
moments during the cache build, training and the export, then rerun until it finishes. Compares with an
uninterrupted run.

    python scripts/kill_campaign.py --out /tmp/kills --kills 3      # 3 kills in each phase

After every kill it checks what a rerun would read: every complete checkpoint's files match its manifest, every
shard the cache (or its partial build) lists is whole, and a `pipeline/` present loads. At the end: the cache shards,
the final checkpoint's weights and the exported pipelines compared byte for byte with the uninterrupted run's.
Prints one JSON line: kills per phase, bytes compared, max |delta weight|, identical.

    python scripts/kill_campaign.py --out /tmp/ranks --rank-death 1  # torchrun, 2 CPU processes: kill -9 rank 1
    python scripts/kill_campaign.py --out /tmp/term --sigterm         # SIGTERM (preemption), then the same command

Both also rerun to the end and compare with an uninterrupted run; --rank-death times how long the other process and
torchrun take to exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PHASES = ("cache", "training", "export")


def make_captioned_folder(out: Path, n: int) -> Path:
    """n coloured digits (32x32 PNG) with their captions in metadata.jsonl: an imagefolder."""
    import numpy as np
    from PIL import Image

    from onestep.data.digits_t2i import load_digits_t2i

    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits_t2i()
    lines = []
    for k, i in enumerate(range(0, len(digits.captions), len(digits.captions) // n)[:n]):
        pixels = ((digits.images[i].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(out / f"{k:04d}.png")
        lines.append(json.dumps({"file_name": f"{k:04d}.png", "text": digits.captions[i]}) + "\n")
    (out / "metadata.jsonl").write_text("".join(lines))
    return out


def train_command(run: Path, images: Path, steps: int, batch: int, shard: int) -> list[str]:
    return [sys.executable, "-m", "onestep.cli", "train", str(ROOT / "configs/t2i/dmd2.yaml"), f"output_dir={run}",
            "data.name=image_folder", f"data.image_dir={images}", f"data.latent_cache={run / 'latents'}",
            f"data.latent_cache_shard_size={shard}", "data.num_workers=0", f"data.batch_size={batch}",
            "options.gan=true", f"train.max_steps={steps}", "train.max_minutes=null", "train.checkpoint_every=2",
            "train.keep_checkpoints=2", "train.log_every=1", "eval.num_samples=4", "eval.features=none",
            "eval.metrics=[]", "options.regression.num_pairs=4", "options.regression.teacher_steps=2"]


def run_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def logged_steps(run: Path) -> list[int]:
    log = run / "log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    return [r["step"] for r in map(_json, lines) if r and "elapsed_s" in r and "event" not in r]


def _json(line: str) -> dict | None:
    try:
        return json.loads(line)
    except ValueError:  # a line cut by the kill
        return None


class Phases:
    """Which phase a run started now has reached, seen from its files (what earlier runs left is not counted)."""

    def __init__(self, run: Path, steps: int):
        self.run, self.steps = run, steps
        self.shards, self.logged, self.exports = self._shards(), len(logged_steps(run)), self._exports()

    def _shards(self) -> int:
        return len(list((self.run / "latents").glob("shard-*")))

    def _exports(self) -> set[str]:
        return {p.name for p in self.run.glob(".pipeline*.tmp")}

    def now(self) -> int:
        """-1: starting, 0: building the cache, 1: training, 2: exporting (PHASES' order)."""
        if self._exports() - self.exports:
            return 2
        logged = logged_steps(self.run)
        if len(logged) > self.logged:
            return 1 if logged[-1] < self.steps else 2
        return 0 if self._shards() > self.shards and not (self.run / "latents" / "latents.json").exists() else -1


def check_readable(run: Path) -> None:
    """What a rerun would read is whole: checkpoints, the cache's listed shards, the export."""
    from safetensors import safe_open

    from onestep.training.checkpoints import complete_checkpoints, damage

    for checkpoint in complete_checkpoints(run / "checkpoints"):
        assert damage(checkpoint) is None, (checkpoint, damage(checkpoint))
    cache = run / "latents"
    for index in ("latents.json", "latents.partial.json"):
        if (cache / index).is_file():
            recorded = json.loads((cache / index).read_text())
            for name in recorded["shards"]:
                assert (cache / name).stat().st_size == recorded["bytes"][name], name
                with safe_open(str(cache / name), "pt") as f:
                    assert set(f.keys()) == {"moments", "rows"}
    if (run / "pipeline").exists():
        assert json.loads((run / "pipeline" / "model_index.json").read_text())["_class_name"] == "OneStepPipeline"


def campaign(out: Path, kills: int, seed: int = 0, images: int = 48, steps: int = 8, batch: int = 4,
             shard: int = 4, launch: Callable[[list[str]], object] | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Run the campaign; `launch(cmd)` starts one training run and returns a handle with .pid, .poll(), .wait()
    (default: a subprocess). A kill aimed at a phase the run has already left is given up (counted as missed)."""
    launch = launch or (lambda cmd: subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.DEVNULL))
    folder = make_captioned_folder(out / "images", images)
    straight, killed = out / "straight", out / "killed"
    t0 = time.time()
    assert launch(train_command(straight, folder, steps, batch, shard)).wait() == 0, "the uninterrupted run failed"
    log(f"uninterrupted run: {time.time() - t0:.0f} s")
    rng = random.Random(seed)
    plan = [k for k in range(len(PHASES)) for _ in range(kills)]
    survived, missed, runs = dict.fromkeys(PHASES, 0), dict.fromkeys(PHASES, 0), 0
    while True:
        runs += 1
        assert runs < 2 * len(PHASES) * kills + 5, f"no end after {runs} runs"
        phases = Phases(killed, steps)
        proc = launch(train_command(killed, folder, steps, batch, shard))
        while plan and proc.poll() is None:
            now = phases.now()
            if now > plan[0]:
                missed[PHASES[plan.pop(0)]] += 1
            elif now == plan[0]:
                time.sleep(rng.uniform(0, (0.3, 1.0, 0.15)[now]))
                if proc.poll() is not None:
                    break
                landed = phases.now()
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                survived[PHASES[plan.pop(0)]] += 1
                log(f"kill -9 #{sum(survived.values())}: aimed at {PHASES[now]}, landed in "
                    f"{PHASES[landed] if landed >= 0 else 'startup'}")
                check_readable(killed)
                break
            else:
                time.sleep(0.01)
        code = proc.wait()
        if code == 0:
            missed = {p: n + sum(PHASES[k] == p for k in plan) for p, n in missed.items()}
            break
        assert code == -signal.SIGKILL, f"run ended with exit code {code}"
    check_readable(killed)
    return {"kills": survived, "missed": missed, "runs": runs, **compare(straight, killed)}


def compare(straight: Path, killed: Path) -> dict:
    """Byte comparison of the cache shards, the final checkpoint and both exports; max |delta| over their tensors."""
    from safetensors.torch import load_file

    from onestep.training.checkpoints import latest_checkpoint

    pairs = [(straight / "latents" / p.name, p) for p in sorted((killed / "latents").glob("shard-*"))]
    if (killed / "latents").is_dir():
        pairs.append((straight / "latents" / "latents.json", killed / "latents" / "latents.json"))
    a_ckpt, b_ckpt = latest_checkpoint(straight / "checkpoints"), latest_checkpoint(killed / "checkpoints")
    pairs += [(a_ckpt / p.name, p) for p in sorted(b_ckpt.glob("model*.safetensors"))]
    for export in ("pipeline", "pipeline_diffusers"):
        pairs += [(straight / export / p.relative_to(killed / export), p)
                  for p in sorted((killed / export).rglob("*.safetensors"))]
    assert len(pairs) == len({b for _, b in pairs}) and all(a.is_file() for a, _ in pairs), "missing files"
    compared, identical, max_delta = 0, True, 0.0
    for a, b in pairs:
        same = a.read_bytes() == b.read_bytes()
        identical &= same
        compared += a.stat().st_size + b.stat().st_size
        if a.suffix == ".safetensors":
            ta, tb = load_file(a), load_file(b)
            for key in ta:
                if ta[key].is_floating_point():
                    max_delta = max(max_delta, float((ta[key].double() - tb[key].double()).abs().max()))
    return {"files_compared": len(pairs), "bytes_compared": compared, "max_abs_delta_weight": max_delta,
            "identical": identical}


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the worker processes a torchrun agent started."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher.pid)], capture_output=True,
                              text=True).stdout.split()
    found = {}
    for pid in children:
        with contextlib.suppress(OSError):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = [v for v in env if v.startswith(b"RANK=")]
            if rank:
                found[int(rank[0][5:])] = int(pid)
    return found


def torchrun_command(run: Path, steps: int) -> list[str]:
    """The documented 2-process CPU launch (docs/multi_gpu.md) of the digits DMD2 config, tiny."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "onestep.cli", "train", str(ROOT / "configs/digits/dmd2.yaml"), f"output_dir={run}",
            f"train.max_steps={steps}", "train.max_minutes=null", "train.checkpoint_every=5", "train.log_every=1",
            "data.batch_size=8", "eval.num_samples=16"]


def kill_one_rank(run: Path, rank: int, steps: int, kill_after: int) -> dict:
    """Two processes under torchrun; SIGKILL to `rank` once `kill_after` steps are logged. Returns how long the other
    process and the launcher took to exit, and the other's `onestep train:` lines; checks its checkpoints."""
    from onestep.training.checkpoints import complete_checkpoints, damage

    env = {**run_env(), "ACCELERATE_USE_CPU": "true"}
    launcher = subprocess.Popen(torchrun_command(run, steps), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    while launcher.poll() is None and len(logged_steps(run)) < kill_after:
        time.sleep(0.02)
    workers = worker_pids(launcher)
    os.kill(workers[rank], signal.SIGKILL)
    killed_at, survivor, survivor_exit = time.monotonic(), workers[1 - rank], None
    while launcher.poll() is None or survivor_exit is None:
        if survivor_exit is None and not Path(f"/proc/{survivor}").exists():
            survivor_exit = time.monotonic() - killed_at
        time.sleep(0.01)
    lines = [line for line in launcher.stderr.read().splitlines() if line.startswith("onestep train:")]
    checkpoints = complete_checkpoints(run / "checkpoints")
    assert checkpoints and all(damage(c) is None for c in checkpoints)  # nothing half-written is taken as complete
    return {"killed_rank": rank, "after_step": logged_steps(run)[-1], "survivor_exit_s": round(survivor_exit, 2),
            "torchrun_exit_s": round(time.monotonic() - killed_at, 2), "lines": lines,
            "resumed_from": int(checkpoints[-1].name.split("-")[1])}


def rank_death(out: Path, rank: int = 1, steps: int = 16, kill_after: int = 7,
               log: Callable[[str], None] = print) -> dict:
    """`kill_one_rank`, then a rerun to the end, compared with an uninterrupted 2-process run."""
    env = {**run_env(), "ACCELERATE_USE_CPU": "true"}
    straight, killed = out / "straight", out / "killed"
    done = subprocess.run(torchrun_command(straight, steps), cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = kill_one_rank(killed, rank, steps, kill_after)
    log(f"kill -9 rank {rank} after step {result['after_step']}: the other exited in {result['survivor_exit_s']} s, "
        f"torchrun in {result['torchrun_exit_s']} s: {result['lines']}")
    assert len(result["lines"]) == 1 and "another process of this run is gone" in result["lines"][0], result
    done = subprocess.run(torchrun_command(killed, steps), cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return {**result, **compare(straight, killed)}


def sigterm(out: Path, steps: int = 40, stop_after: int = 10, log: Callable[[str], None] = print) -> dict:
    """`onestep train configs/digits/dmd2.yaml` sent SIGTERM once `stop_after` steps are logged (a SLURM preemption):
    seconds to exit, exit code, its line; then the same command to the end, compared with an uninterrupted run."""
    def command(run: Path) -> list[str]:
        return [sys.executable, "-m", "onestep.cli", "train", str(ROOT / "configs/digits/dmd2.yaml"),
                f"output_dir={run}", f"train.max_steps={steps}", "train.max_minutes=null",
                "train.checkpoint_every=100", "train.log_every=1", "data.batch_size=8", "eval.num_samples=16"]

    straight, stopped = out / "straight", out / "stopped"
    done = subprocess.run(command(straight), cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(command(stopped), cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and len(logged_steps(stopped)) < stop_after:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    lines = [line for line in proc.communicate()[1].splitlines() if line.startswith("onestep train:")]
    result = {"exit_code": proc.returncode, "exit_s": round(time.monotonic() - sent, 2), "lines": lines,
              "exported": (stopped / "pipeline" / "model_index.json").is_file()}
    log(f"SIGTERM after step {logged_steps(stopped)[-1]}: exit {proc.returncode} in {result['exit_s']} s: {lines}")
    done = subprocess.run(command(stopped), cwd=ROOT, env=run_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return {**result, **compare(straight, stopped)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="an empty folder for the two runs")
    parser.add_argument("--kills", type=int, default=3, help="kills in each phase (cache build, training, export)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank-death", type=int, default=None, metavar="RANK",
                        help="instead: two processes (torchrun, CPU), kill -9 this rank mid-run, rerun, compare")
    parser.add_argument("--sigterm", action="store_true",
                        help="instead: SIGTERM to a digits run mid-run, rerun, compare with an uninterrupted run")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"kill_campaign: --out {out} is not empty")
    say = lambda line: print(line, file=sys.stderr)  # noqa: E731
    if args.rank_death is not None:
        result = rank_death(out, args.rank_death, log=say)
    elif args.sigterm:
        result = sigterm(out, log=say)
    else:
        result = campaign(out, args.kills, args.seed, args.images, args.steps, log=say)
    print(json.dumps(result))
    sys.exit(0 if result["identical"] else 1)


if __name__ == "__main__":
    main()
