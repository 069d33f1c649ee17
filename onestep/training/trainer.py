"""The accelerate training loop every method runs in: updates on their cadence, EMA, checkpoints, logs, evals."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, ProjectConfiguration, parse_flag_from_env, set_seed

from onestep.errors import PeerLost, UserInputError
from onestep.files import remove_leftovers, write_json_atomic
from onestep.models.networks import reachable_modules
from onestep.models.unet import diffusers_models, enable_gradient_checkpointing
from onestep.training.checkpoints import (
    latest_checkpoint,
    read_state,
    refuse_changed_frozen_tensors,
    require_intact,
    save_checkpoint,
    verified_checkpoint,
)
from onestep.training.progress import Progress
from onestep.training.sharding import (
    FullStateEMA,
    Skeleton,
    clip_sharded_grad_norm_,
    shared_with_frozen,
    swapped_attributes,
)
from onestep.training.tracking import TRACKERS, check_tracker, log_grid, tracker_config
from onestep.training.updates import Update, make_lr_scheduler, make_optimizer


class TrainingTask(Protocol):
    """What the trainer needs from a method (a distiller, or the teacher's own denoising training)."""

    def updates(self) -> list[Update]: ...

    def evaluate(self) -> dict[str, float]: ...

    def sample_images(self) -> torch.Tensor | None: ...

    def export_pipeline(self, out_dir: Path) -> None: ...

    # optional: `begin_step(step) -> logs`, called before each step's updates (schedules that depend on the step, e.g.
    # DisBack's moving target); it must be a pure function of `step` so that a resumed run picks up exactly.
    # optional: `attention_backend`, the attention implementation its networks run (onestep.models.attention); logged.
    # optional: `sample_labels() -> list[str] | None`, the prompt of each `sample_images()` image (written under it).
    # optional: `checkpointed() -> list`, objects with state_dict / load_state_dict that checkpoints keep (a stream).
    #
    # Multi-process training (`accelerate launch` / `torchrun`): every process runs the same task on its own random
    # numbers (the seed is offset by the process index), so `data.batch_size` is per process and the global batch is
    # batch_size x num_processes; DDP averages the gradients. A task that must split one global batch across processes
    # instead (e.g. a deterministic test) reads its share from `process_state()` (`process_index`, `num_processes`).
    # Logged numbers are averaged over processes, so every process must log the same keys at a step.


@dataclass
class TrainerConfig:
    """Loop settings (the `train:` section of a config)."""

    max_steps: int = 1000  # training steps (may be raised on a resume)
    max_minutes: float | None = None  # stop early (cleanly, with a checkpoint) after this wall time
    seed: int = 0  # noise and data order (offset per process)
    # no | fp16 | bf16; unset: whatever the launcher says (`accelerate launch --mixed_precision`, accelerate config),
    # else no
    mixed_precision: str | None = None
    # each optimizer step sums the gradients of this many micro-batches (global batch = data.batch_size x this x
    # processes); the cadence (`every`), the LR schedule and the EMA count iterations / optimizer steps, not
    # micro-batches
    gradient_accumulation_steps: int = 1
    log_every: int = 10  # steps between log.jsonl lines
    report_to: str = "none"  # none | tensorboard | wandb: accelerate's trackers, beside the JSONL log always written
    progress_every_s: float = 30.0  # when stderr is not a terminal: one progress line this often instead of a bar
    eval_every: int = 0  # 0 = only at the end
    sample_every: int = 0  # 0 = only at the end
    checkpoint_every: int = 500  # steps between checkpoints (0: at the end only)
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    max_nonfinite_in_a_row: int = 20  # stop after N skipped non-finite updates
    resume: bool = True  # continue from the newest checkpoint in output_dir
    # SIGTERM / SIGINT: seconds until the SIGKILL that follows (SLURM's KillWait, 30 s by default). The run finishes
    # its step and checkpoints, then exports its pipeline if at least half of this is left; a second signal stops it
    # at once (every write is atomic, so nothing is left half-written)
    stop_grace_s: float = 30.0
    # memory and speed (all off by default): recompute the activations of every network's blocks in the backward pass
    # instead of keeping them; compile the trained networks' forward with torch.compile and this backend
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the trained networks
    compile_backend: str = "inductor"  # torch.compile's backend


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
        # the LR schedule counts iterations whatever the number of processes (accelerate's default would step a
        # prepared scheduler once per process, i.e. warm up N times faster under N processes, as DMD2's does)
        check_tracker(config.report_to)
        project = ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs"))
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, step_scheduler_with_optimizer=False,
                                       log_with=TRACKERS[config.report_to], project_config=project)
        _check_launch(self.accelerator.num_processes)
        set_seed(config.seed, device_specific=True)  # each process draws its own noise and conditions
        for network in reachable_modules(task):  # frozen networks too (the teacher): prepare() moves trained ones only
            if getattr(network, "execution_device", None) is None:  # an offloaded teacher places itself per call
                network.to(self.accelerator.device)
            if config.gradient_checkpointing:
                enable_gradient_checkpointing(network)
        self.updates = task.updates()
        if config.compile:
            for update in self.updates:
                for model in diffusers_models(update.module):
                    model.compile(backend=config.compile_backend)
        self.counter = _StepCounter()
        self.optimizers, self.lr_schedulers, self.modules, self.emas = {}, {}, {}, {}
        self.skeletons: dict[str, Skeleton] = {}  # FSDP: plain copies of the trained networks, for the export
        if self.sharded:
            _check_sharding(self.accelerator)
        _guard_shared_base(self.accelerator, task, self.updates)
        for update in self.updates:
            if self.sharded:
                self.skeletons[update.name] = Skeleton(update.module)
            optimizer = make_optimizer([p for p in update.module.parameters() if p.requires_grad], update.optimizer)
            scheduler = make_lr_scheduler(optimizer, update.optimizer)
            module, optimizer, scheduler = self.accelerator.prepare(update.module, optimizer, scheduler)
            self.modules[update.name], self.optimizers[update.name] = module, optimizer
            self.lr_schedulers[update.name] = scheduler
            if update.ema_decay is not None:
                params = [p for p in module.parameters() if p.requires_grad]  # FSDP2 replaces them with shards
                ema = FullStateEMA(params, decay=update.ema_decay)
                self.accelerator.register_for_checkpointing(ema)
                self.emas[update.name] = (ema, params)
        self.accelerator.register_for_checkpointing(self.counter)
        for stateful in getattr(task, "checkpointed", list)():  # e.g. a data stream's position
            self.accelerator.register_for_checkpointing(stateful)
        self.custom_states = len(self.emas) + 1 + len(getattr(task, "checkpointed", list)())
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.history: list[dict] = []
        self.stop_signal: str | None = None
        self.stop_time = 0.0  # time.monotonic() when the stop signal arrived
        self.signals_received = 0  # by this process: a second one stops it at once

    # --- helpers ----------------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.counter.step

    @property
    def sharded(self) -> bool:
        """FSDP: the trained networks hold shards (onestep.training.sharding)."""
        return self.accelerator.distributed_type == DistributedType.FSDP

    def export(self, metrics: dict | None = None) -> None:
        """The task's pipeline with the EMA weights, written by the main process, then `metrics` (metrics.json, at
        the end of training) and the model card. Under FSDP every process first takes part in gathering each trained
        network's whole weights, and the main process exports plain copies. Every folder and file is replaced only
        when complete, so a write that fails (a full disk) leaves what was there: one line, UserInputError."""
        try:
            self._export()
            if self.accelerator.is_main_process:
                if metrics is not None:
                    write_json_atomic(self.output_dir / "metrics.json", metrics)
                from onestep.export.model_card import write_model_card

                run_config = self.run_config or {"method": type(self.task).__name__, "train": vars(self.config)}
                write_model_card(self.output_dir / "pipeline", run_config, metrics)
        except OSError as err:
            raise UserInputError(f"cannot write the export in {self.output_dir} ({err.strerror or err}); the previous "
                                 f"export is as it was and {_last_checkpoint_line(self.output_dir)}") from None
        self.accelerator.wait_for_everyone()

    def _export(self) -> None:
        with self.ema_weights():
            if not self.sharded:
                if self.accelerator.is_main_process:
                    self.task.export_pipeline(self.output_dir / "pipeline")
                return
            states = {name: self.accelerator.get_state_dict(module) for name, module in self.modules.items()}
        if self.accelerator.is_main_process:
            plain = {id(self.modules[name]): self.skeletons[name].materialize(state) for name, state in states.items()}
            with swapped_attributes(self.task, plain):
                self.task.export_pipeline(self.output_dir / "pipeline")

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
        scalars = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if scalars:
            self.accelerator.log(scalars, step=record["step"])

    def _run_update(self, update: Update) -> dict[str, float]:
        """One optimizer step of `update` over `gradient_accumulation_steps` micro-batches, each drawn by its loss.

        The micro-batch losses are averaged (each backward takes loss / k), so k micro-batches of b give the gradient
        of one batch of k*b. Under DDP only the last backward all-reduces (`no_sync`). accelerate's own
        `accumulate()` counts calls across all models, which two updates on different cadences would entangle.
        """
        module, optimizer = self.modules[update.name], self.optimizers[update.name]
        optimizer.zero_grad(set_to_none=True)
        k = self.config.gradient_accumulation_steps
        totals: dict[str, float] = {}
        for micro in range(k):
            sync = contextlib.nullcontext() if micro == k - 1 else self.accelerator.no_sync(module)
            with sync:
                with self.accelerator.autocast():
                    out = update.loss(module)
                if self._on_any_process(not torch.isfinite(out.loss)):  # all skip together, or DDP would wait
                    optimizer.zero_grad(set_to_none=True)
                    return self._skip(update, "loss")
                self.accelerator.backward(out.loss / k)
            for key, value in {**out.logs, "loss": out.loss.item()}.items():
                totals[key] = totals.get(key, 0.0) + value / k
        params = [p for p in module.parameters() if p.requires_grad]
        if self.sharded:
            grad_norm = clip_sharded_grad_norm_(self.accelerator, params, update.optimizer.grad_clip)
        elif update.optimizer.grad_clip:
            grad_norm = self.accelerator.clip_grad_norm_(params, update.optimizer.grad_clip)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        if not torch.isfinite(torch.as_tensor(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            return self._skip(update, "gradient")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # free them now: they would sit beside the next update's activations
        if update.name in self.emas:
            ema, ema_params = self.emas[update.name]
            ema.step(ema_params)
        self.nonfinite_in_a_row = 0
        logs = {f"{update.name}/{key}": value for key, value in totals.items()}
        logs[f"{update.name}/grad_norm"] = float(grad_norm)
        logs[f"{update.name}/lr"] = self.lr_schedulers[update.name].get_last_lr()[0]
        return logs

    def _step_lr_schedulers(self) -> None:
        """Every update's LR schedule advances once per iteration, whether or not the update ran in it (as DMD2
        steps both schedulers every iteration): `warmup_steps` and `lr_decay_steps` count iterations, as
        `max_steps` does. An fp16 step skipped for overflowing gradients does not advance its schedule."""
        for name, scheduler in self.lr_schedulers.items():
            if not self.optimizers[name].step_was_skipped:
                scheduler.step()

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

    # --- processes ----------------------------------------------------------------------------------------------
    def _on_any_process(self, flag: bool) -> bool:
        """Whether `flag` holds on any process: a decision that changes which collective calls follow (skipping a
        backward pass, leaving the loop) must be the same on every process, or the others wait for it forever."""
        if self.accelerator.num_processes == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor(float(flag), device=self.accelerator.device), "max"))

    def _mean_over_processes(self, logs: dict[str, float]) -> dict[str, float]:
        """The logged numbers averaged over processes: each process's loss is that of its share of the global batch."""
        if self.accelerator.num_processes == 1 or not logs:
            return logs
        keys = sorted(logs)
        values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        return dict(zip(keys, self.accelerator.reduce(values, "mean").tolist(), strict=True))

    def _stop_reason(self) -> str | None:
        """Why the loop ends before this step (a signal, the time budget), agreed by all processes: a signal reaches
        them at different steps and their clocks differ, but they must leave the loop at the same step."""
        signum = signal.Signals[self.stop_signal].value if self.stop_signal is not None else 0
        budget = self.config.max_minutes
        over_budget = budget is not None and self.counter.elapsed >= 60 * budget
        if self.accelerator.num_processes > 1:
            votes = torch.tensor([signum, float(over_budget)], device=self.accelerator.device)
            signum, over_budget = (int(v) for v in self.accelerator.reduce(votes, "max").tolist())
        if signum:
            if self.stop_signal is None:  # heard from another process: the grace period runs from here
                self.stop_time = time.monotonic()
            self.stop_signal = signal.Signals(signum).name
            return f"stopped by {self.stop_signal}"
        return f"stopped at the {budget}-minute budget" if over_budget else None

    def _checkpoint(self) -> None:
        broken = [name for name, module in self.modules.items()
                  if not all(torch.isfinite(p).all() for p in module.parameters())]
        if broken:  # never write a NaN weight: the last complete checkpoint stays the newest
            raise FloatingPointError(f"non-finite weights in {', '.join(broken)} at step {self.step}: not saved; "
                                     "the last complete checkpoint is intact")
        state = {"step": self.step, "elapsed": self.counter.elapsed, "config": self.run_config,
                 "history": self.history}  # metrics.json keeps the evaluations from before a resume
        save_checkpoint(self.accelerator, self.output_dir / "checkpoints", self.step, state,
                        self.config.keep_checkpoints)

    def resume(self, checkpoint: Path | None = None) -> bool:
        """Load `checkpoint`, or else the newest complete, intact checkpoint in output_dir/checkpoints, if any (a
        damaged newer one is named in one line on stderr, and in the log, and passed over)."""
        if checkpoint is not None:
            found, damaged = require_intact(checkpoint), []
        else:
            found, damaged = verified_checkpoint(self.output_dir / "checkpoints")
        for line in damaged:
            if self.accelerator.is_main_process:
                print(f"onestep: {line}", file=sys.stderr)
            self._log({"step": self.step, "event": line})
        if found is None:
            return False
        if len(list(found.glob("custom_checkpoint_*.pkl"))) != self.custom_states:
            raise UserInputError(f"checkpoint {found} holds another set of states than this run keeps (written before "
                                 "checkpoints kept the data stream's position?); start over with --overwrite")
        self.accelerator.load_state(str(found))
        state = read_state(found)
        assert self.counter.step == state["step"]
        self._use_configured_lrs()
        self.history = list(state.get("history", []))  # checkpoints written before it was kept: none
        try:  # a run that finished at this step also has its final evaluation, made after the checkpoint
            finished = json.loads((self.output_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            finished = None
        if isinstance(finished, dict) and finished.get("step") == self.step:
            self.history = list(finished.get("history", self.history))
        return True

    def _use_configured_lrs(self) -> None:
        """The configured learning rates after a resume (the checkpoint's optimizer and schedule state hold the old
        ones): the schedule continues at its step with the new base rate."""
        for update in self.updates:
            scheduler = self.lr_schedulers[update.name].scheduler  # accelerate's wrapper around the LambdaLR
            lr = update.optimizer.lr
            if all(base == lr for base in scheduler.base_lrs):
                continue
            scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
            for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
                group["initial_lr"], group["lr"] = lr, lr * factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    def _at_budget(self) -> str | None:
        """Which budget a (resumed) run has already reached, if any."""
        cfg = self.config
        if self.step >= cfg.max_steps:
            return f"train.max_steps={cfg.max_steps}"
        if cfg.max_minutes is not None and self.counter.elapsed >= 60 * cfg.max_minutes:
            return f"train.max_minutes={cfg.max_minutes}"
        return None

    def _announce_resume(self) -> dict | None:
        """Say on the console where a resumed run continues. A run that already reached its budget says so and,
        where its end was recorded (metrics.json at this step), returns its final metrics without recomputing them."""
        budget = self._at_budget()
        if budget is None:
            self._say(f"resumed from step {self.step} of {self.config.max_steps} in {self.output_dir}")
            return None
        self._say(f"{self.output_dir} already reached its budget ({budget}) at step {self.step}: nothing to train; "
                  "raise train.max_steps / train.max_minutes to continue it")
        try:
            finished = json.loads((self.output_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            return None
        recorded = isinstance(finished, dict) and finished.get("step") == self.step
        return finished["final"] if recorded and isinstance(finished.get("final"), dict) else None

    def _say(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(f"onestep: {message}", file=sys.stderr, flush=True)

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

            labels = self.task.sample_labels() if hasattr(self.task, "sample_labels") else None
            save_grid(images, self.output_dir / name, labels=labels)
            log_grid(self.accelerator, "samples", images, self.step)

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT / SIGTERM end the loop after the current step; the run then checkpoints and returns. A second one
        raises StoppedAtOnce wherever the run is: the atomic writes in flight remove their temporary files."""
        def request_stop(signum, frame):
            name = signal.Signals(signum).name
            self.signals_received += 1
            if self.signals_received > 1:
                raise StoppedAtOnce(f"stopped at once by a second {name} at step {self.step}; "
                                    f"{_last_checkpoint_line(self.output_dir)}")
            self.stop_signal, self.stop_time = name, time.monotonic()

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
        self.accelerator.init_trackers("onestep", config=tracker_config(self.run_config or {"train": self.config}))
        try:
            with self._stop_on_signals():
                return self._train()
        except RuntimeError as err:
            if self.accelerator.num_processes == 1 or not _collective_failure(err):
                raise
            raise PeerLost(f"process {self.accelerator.process_index}: another process of this run is gone "
                           f"({_first_line(err)}) at step {self.step}; {_last_checkpoint_line(self.output_dir)}; "
                           "run the same command again to resume") from None
        finally:  # not accelerator.end_training(): it also ends the process group, which a next run may need
            for tracker in self.accelerator.trackers:
                tracker.finish()

    def _train(self) -> dict:
        cfg = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:  # a killed run's half-written export or checkpoint, never read
            remove_leftovers(self.output_dir)
            for partial in (self.output_dir / "checkpoints").glob(".tmp-checkpoint-*"):
                shutil.rmtree(partial, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        resumed = cfg.resume and self.resume()
        attention = getattr(self.task, "attention_backend", None)  # set by onestep.runs: the kernel that runs
        self._log({"step": self.step, "event": "resumed" if resumed else "started",
                   "mixed_precision": self.accelerator.mixed_precision,
                   # what runs: `accelerate launch --cpu --num_processes 2` runs ONE process (docs/multi_gpu.md)
                   "num_processes": self.accelerator.num_processes,
                   "distributed_type": self.accelerator.distributed_type.value,
                   **({"attention": attention} if attention else {})})
        if resumed:
            finished = self._announce_resume()
            if finished is not None:
                return finished
        progress = Progress(cfg.max_steps, cfg.max_minutes, self.step, cfg.progress_every_s,
                            enabled=self.accelerator.is_main_process and self._at_budget() is None)
        start = time.perf_counter() - self.counter.elapsed
        running: dict[str, float] = {}
        while self.step < cfg.max_steps:
            stop = self._stop_reason()
            if stop is not None:
                self._log({"step": self.step, "event": stop})
                break
            logs: dict[str, float] = {}
            if hasattr(self.task, "begin_step"):
                logs.update(self.task.begin_step(self.step))
            for update in self.updates:
                if update.runs_at(self.step):
                    logs.update(self._run_update(update))
            self._step_lr_schedulers()
            self.counter.step += 1
            self.counter.elapsed = time.perf_counter() - start
            running.update(logs)
            postfix = None
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                record = self._mean_over_processes(running)
                postfix = {k.split("/")[0][:3] + "/" + k.split("/")[-1]: f"{v:.3g}"
                           for k, v in record.items() if k.endswith("loss")}
                self._log({"step": self.step, "elapsed_s": round(self.counter.elapsed, 2), **record})
            progress.update(self.step, self.counter.elapsed, postfix)
            evaluating = bool(cfg.eval_every) and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps
            if evaluating:
                self.evaluate()
            if evaluating or (cfg.sample_every and self.step % cfg.sample_every == 0):  # a grid at every eval too
                self.save_samples(f"samples-{self.step:07d}.png")
                start = time.perf_counter() - self.counter.elapsed  # evaluation and sampling are not training time
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self._checkpoint()
        progress.close(finished=self.stop_signal is None)
        if not (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
            self._checkpoint()
        if self.stop_signal is not None:
            return self._stopped()
        final = self.evaluate()
        self.save_samples()
        self.export({"step": self.step, "train_seconds": round(self.counter.elapsed, 2),
                     "nonfinite_updates_skipped": self.nonfinite_total, "final": final, "history": self.history})
        return final

    def _stopped(self) -> dict:
        """After a stop signal and its checkpoint: the export, where the grace period leaves time for it (no
        evaluation: it could take minutes). Returns what was written, and why the export was skipped if it was."""
        result = {"interrupted": self.stop_signal, "step": self.step,
                  "checkpoint": str(latest_checkpoint(self.output_dir / "checkpoints"))}
        left = self.config.stop_grace_s - (time.monotonic() - self.stop_time)
        if self._on_any_process(left < self.config.stop_grace_s / 2):
            result["export_skipped"] = (f"{max(left, 0):.0f} s of the {self.config.stop_grace_s:g} s grace period "
                                        "left after the checkpoint (train.stop_grace_s)")
            return result
        self.export()
        result["pipeline"] = str(self.output_dir / "pipeline")
        return result


class StoppedAtOnce(KeyboardInterrupt):
    """A second stop signal: the run leaves wherever it is (its message is one line)."""


def _collective_failure(err: RuntimeError) -> bool:
    """A collective call that failed because a peer is gone (gloo: its connection closed; NCCL: DistBackendError)."""
    text = str(err)
    return isinstance(err, torch.distributed.DistBackendError) or "gloo" in text or "Connection reset" in text \
        or "Connection closed" in text


def _first_line(err: Exception) -> str:
    """An error's first line without the source location gloo puts in front ("[.../pair.cc:537] Read error")."""
    line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    line = line.split("] ", 1)[1] if line.startswith("[") and "] " in line else line
    return line.split(". ", 1)[0]  # gloo goes on with advice that does not fit here


def _last_checkpoint_line(output_dir: Path) -> str:
    last = latest_checkpoint(output_dir / "checkpoints")
    return f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet"


def process_state() -> PartialState:
    """accelerate's process state (`process_index`, `num_processes`, `is_main_process`, `main_process_first()`) as the
    Trainer's Accelerator will see it. The first call fixes the state for the whole process, and a bare
    `PartialState()` ignores ACCELERATE_USE_CPU (`accelerate launch --cpu`): code that asks before the Trainer exists
    (building a task) must ask here, or CPU processes would each run alone."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _check_sharding(accelerator: Accelerator) -> None:
    """What FSDP needs: FSDP2 (`fsdp_version: 2`); trained networks that hold no tensor of a frozen one are checked
    by `Trainer._guard_shared_frozen_tensors`."""
    if not accelerator.is_fsdp2:
        raise UserInputError("onestep trains under FSDP2 only: set fsdp_version: 2 in the accelerate config "
                             "(FSDP1's flat parameters break the frozen calls, EMA and export)")


def _guard_shared_base(accelerator: Accelerator, task: TrainingTask, updates: list[Update]) -> None:
    """Trained networks holding a frozen network's tensors (`lora.share_base`): refused under FSDP (they would be
    sharded) and DeepSpeed (its engine casts the whole module it wraps to bf16 / fp16 and under ZeRO-3 partitions
    it, shared teacher tensors included); elsewhere a resume must not write into them
    (`refuse_changed_frozen_tensors`, an accelerate load_state pre-hook)."""
    trained = [u.module for u in updates]
    frozen = [m for m in reachable_modules(task) if not any(m is t for t in trained)]
    if not shared_with_frozen(trained, frozen):
        return
    for kind, why in ((DistributedType.FSDP, "they would be sharded"),
                      (DistributedType.DEEPSPEED, "its engine casts and partitions them")):
        if accelerator.distributed_type == kind:
            raise UserInputError(f"under {kind.value} the LoRA networks cannot share the teacher's weights ({why}): "
                                 "set options.lora.share_base=false")
    held = {id(t) for m in frozen for t in (*m.parameters(), *m.buffers())}
    accelerator.register_load_state_pre_hook(functools.partial(refuse_changed_frozen_tensors, frozen=held))


def _check_launch(num_processes: int) -> None:
    """A launcher started several processes but accelerate runs each alone (on a machine without GPUs accelerate
    needs to be told to use the CPU): they would train side by side and overwrite each other's files."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != num_processes:
        raise UserInputError(f"launched as {launched} processes but accelerate runs {num_processes}; without GPUs "
                             "set ACCELERATE_USE_CPU=true (or use `accelerate launch --cpu`)")
