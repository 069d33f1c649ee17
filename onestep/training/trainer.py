"""The accelerate training loop every method runs in: updates on their cadence, EMA, checkpoints, logs, evals."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from onestep.files import write_json_atomic
from onestep.networks import reachable_modules
from onestep.training.checkpoints import latest_checkpoint, read_state, save_checkpoint
from onestep.training.updates import Update, make_optimizer


class TrainingTask(Protocol):
    """What the trainer needs from a method (a distiller, or the teacher's own denoising training)."""

    def updates(self) -> list[Update]: ...

    def evaluate(self) -> dict[str, float]: ...

    def sample_images(self) -> torch.Tensor | None: ...

    def export_pipeline(self, out_dir: Path) -> None: ...

    # optional: `begin_step(step) -> logs`, called before each step's updates (schedules that depend on the step, e.g.
    # DisBack's moving target); it must be a pure function of `step` so that a resumed run picks up exactly.
    # optional: `attention_backend`, the attention implementation its networks run (onestep.attention); logged.


@dataclass
class TrainerConfig:
    """Loop settings (the `train:` section of a config)."""

    max_steps: int = 1000
    max_minutes: float | None = None  # stop early (cleanly, with a checkpoint) after this wall time
    seed: int = 0
    mixed_precision: str = "no"  # no | fp16 | bf16
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    sample_every: int = 0  # 0 = only at the end
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    max_nonfinite_in_a_row: int = 20
    resume: bool = True


class _StepCounter:
    """The loop position, saved in accelerate checkpoints alongside models and RNG states."""

    def __init__(self) -> None:
        self.step = 0
        self.elapsed = 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "elapsed": self.elapsed}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])


class Trainer:
    """Runs a TrainingTask: for each step, every update whose cadence matches takes one optimizer step.

    A critic updated every step and a generator every N-th step are just two updates with every=1 and every=N.
    """

    def __init__(self, task: TrainingTask, output_dir: str | Path, config: TrainerConfig,
                 run_config: dict | None = None):
        self.task, self.config, self.output_dir = task, config, Path(output_dir)
        self.run_config = run_config or {}
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision)
        set_seed(config.seed, device_specific=True)
        for network in reachable_modules(task):  # frozen networks too (the teacher): prepare() moves trained ones only
            network.to(self.accelerator.device)
        self.updates = task.updates()
        self.counter = _StepCounter()
        self.optimizers, self.lr_schedulers, self.modules, self.emas = {}, {}, {}, {}
        for update in self.updates:
            params = [p for p in update.module.parameters() if p.requires_grad]
            optimizer = make_optimizer(params, update.optimizer)
            scheduler = get_scheduler("constant_with_warmup", optimizer,
                                      num_warmup_steps=update.optimizer.warmup_steps)
            module, optimizer, scheduler = self.accelerator.prepare(update.module, optimizer, scheduler)
            self.modules[update.name], self.optimizers[update.name] = module, optimizer
            self.lr_schedulers[update.name] = scheduler
            if update.ema_decay is not None:
                ema = EMAModel(params, decay=update.ema_decay)
                self.accelerator.register_for_checkpointing(ema)
                self.emas[update.name] = (ema, params)
        self.accelerator.register_for_checkpointing(self.counter)
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.history: list[dict] = []
        self._tb = None
        self.stop_signal: str | None = None

    # --- helpers ----------------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.counter.step

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Swap EMA weights in (evaluation, sampling, export), and the trained weights back afterwards."""
        for ema, params in self.emas.values():
            ema.store(params)
            ema.copy_to(params)
        try:
            yield
        finally:
            for ema, params in self.emas.values():
                ema.restore(params)

    def _log(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.output_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])

    def _open_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional; the JSONL log is always written
            return
        self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))

    def _run_update(self, update: Update) -> dict[str, float]:
        module, optimizer = self.modules[update.name], self.optimizers[update.name]
        optimizer.zero_grad(set_to_none=True)
        with self.accelerator.autocast():
            out = update.loss(module)
        if not torch.isfinite(out.loss):
            return self._skip(update, "loss")
        self.accelerator.backward(out.loss)
        params = [p for p in module.parameters() if p.requires_grad]
        if update.optimizer.grad_clip:
            grad_norm = self.accelerator.clip_grad_norm_(params, update.optimizer.grad_clip)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        if not torch.isfinite(torch.as_tensor(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            return self._skip(update, "gradient")
        optimizer.step()
        self.lr_schedulers[update.name].step()
        if update.name in self.emas:
            ema, ema_params = self.emas[update.name]
            ema.step(ema_params)
        self.nonfinite_in_a_row = 0
        logs = {f"{update.name}/{k}": v for k, v in out.logs.items()}
        logs[f"{update.name}/loss"] = out.loss.item()
        logs[f"{update.name}/grad_norm"] = float(grad_norm)
        return logs

    def _skip(self, update: Update, what: str) -> dict[str, float]:
        """A non-finite loss or gradient: skip this update, count it, stop after too many in a row."""
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        self._log({"step": self.step, "event": f"skipped {update.name} update: non-finite {what}",
                   "nonfinite_total": self.nonfinite_total})
        if self.nonfinite_in_a_row >= self.config.max_nonfinite_in_a_row:
            raise FloatingPointError(f"{self.nonfinite_in_a_row} non-finite updates in a row at step {self.step}; "
                                     "stopped, the last checkpoint is intact")
        return {}

    def _checkpoint(self) -> None:
        state = {"step": self.step, "elapsed": self.counter.elapsed, "config": self.run_config}
        save_checkpoint(self.accelerator, self.output_dir / "checkpoints", self.step, state,
                        self.config.keep_checkpoints)

    def resume(self) -> bool:
        """Load the newest complete checkpoint in output_dir/checkpoints, if any."""
        found = latest_checkpoint(self.output_dir / "checkpoints")
        if found is None:
            return False
        self.accelerator.load_state(str(found))
        assert self.counter.step == read_state(found)["step"]
        return True

    def evaluate(self) -> dict[str, float]:
        with self.ema_weights():
            metrics = self.task.evaluate()
        record = {"step": self.step, "elapsed_s": round(self.counter.elapsed, 2), **metrics}
        self.history.append(record)
        self._log({"event": "eval", **record})
        return metrics

    def save_samples(self, name: str = "samples.png") -> None:
        with self.ema_weights():
            images = self.task.sample_images()
        if images is not None and self.accelerator.is_main_process:
            from onestep.eval.grid import save_grid

            save_grid(images, self.output_dir / name)

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT / SIGTERM end the loop after the current step; the run then checkpoints and returns."""
        def request_stop(signum, frame):
            self.stop_signal = signal.Signals(signum).name

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    # --- the loop ---------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Train to max_steps (or max_minutes), export, write metrics.json; returns the final metrics.

        Interrupted by SIGINT/SIGTERM, it saves a checkpoint and returns {"interrupted": signal name} instead.
        """
        with self._stop_on_signals():
            return self._train()

    def _train(self) -> dict:
        cfg = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        resumed = cfg.resume and self.resume()
        if self.accelerator.is_main_process:
            self._open_tensorboard()
        attention = getattr(self.task, "attention_backend", None)  # set by onestep.runs: the kernel that runs
        self._log({"step": self.step, "event": "resumed" if resumed else "started",
                   **({"attention": attention} if attention else {})})
        progress = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.accelerator.is_main_process,
                        dynamic_ncols=True, desc="train")
        start = time.perf_counter() - self.counter.elapsed
        running: dict[str, float] = {}
        while self.step < cfg.max_steps:
            if self.stop_signal is not None:
                self._log({"step": self.step, "event": f"stopped by {self.stop_signal}"})
                break
            if cfg.max_minutes is not None and self.counter.elapsed >= 60 * cfg.max_minutes:
                self._log({"step": self.step, "event": f"stopped at the {cfg.max_minutes}-minute budget"})
                break
            logs: dict[str, float] = {}
            if hasattr(self.task, "begin_step"):
                logs.update(self.task.begin_step(self.step))
            for update in self.updates:
                if update.runs_at(self.step):
                    logs.update(self._run_update(update))
            self.counter.step += 1
            self.counter.elapsed = time.perf_counter() - start
            running.update(logs)
            progress.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                progress.set_postfix({k.split("/")[0][:3] + "/" + k.split("/")[-1]: f"{v:.3g}"
                                      for k, v in running.items() if k.endswith("loss")})
                self._log({"step": self.step, "elapsed_s": round(self.counter.elapsed, 2), **running})
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                self.evaluate()
                start = time.perf_counter() - self.counter.elapsed  # evaluation time is not training time
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self.save_samples(f"samples-{self.step:07d}.png")
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self._checkpoint()
        progress.close()
        if not (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
            self._checkpoint()
        if self.stop_signal is not None:
            return {"interrupted": self.stop_signal, "step": self.step}
        final = self.evaluate()
        self.save_samples()
        if self.accelerator.is_main_process:
            with self.ema_weights():
                self.task.export_pipeline(self.output_dir / "pipeline")
            metrics = {"step": self.step, "train_seconds": round(self.counter.elapsed, 2),
                       "nonfinite_updates_skipped": self.nonfinite_total, "final": final, "history": self.history}
            write_json_atomic(self.output_dir / "metrics.json", metrics)
        if self._tb is not None:
            self._tb.close()
        self.accelerator.wait_for_everyone()
        return final

