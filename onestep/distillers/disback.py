"""DisBack (Zhang et al. 2024/25): distill along the teacher's degradation path, backwards.

Algorithm (a schedule over a base distiller's "real" score; the base's losses are unchanged):
  stage 1, degradation recording:  theta_0 = teacher; fine-tune a teacher copy with the denoising loss on samples
           sg(G_0(z)) of the *initial* generator (after `init_generator` has loaded it, as the official code
           does), saving theta_1 .. theta_N every `steps_per_checkpoint` steps (the path teacher -> p_G0);
  stage 2, backtracking:           fake score <- theta_N (it already fits G_0); the real score starts at
           theta_{N-1} and moves one checkpoint toward the teacher every `switch_every` steps, ending on theta_0 =
           the teacher's exact weights; from then on it is ordinary distillation.
The paper's point: early on, the generator is matched to a target it is close to instead of the far-away teacher.
Checkpoints load strictly (the public code's strict=False silently loaded nothing) and every switch is logged.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from onestep.distillers.dmd import DMD, DMDOptions
from onestep.distillers.sid import SiD, SiDOptions
from onestep.files import atomic_file, write_json_atomic
from onestep.models.denoising import denoising_loss
from onestep.models.loading import DTYPES
from onestep.models.unet import load_weights, unet_forward
from onestep.training.updates import OptimizerConfig, make_optimizer


PATH_INDEX = "path.json"  # written last: a path folder without it is incomplete and is recorded again


@dataclass
class BacktrackOptions:
    """The DisBack part of the options (mixed into the base distiller's options)."""

    path_dir: str | None = None  # where the path is recorded / reused from; default OUTPUT_DIR/path
    num_checkpoints: int = 4  # N: theta_1 .. theta_N after the teacher theta_0
    steps_per_checkpoint: int = 50  # stage-1 denoising steps between two recorded checkpoints
    path_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-4))  # stage 1
    path_dtype: str = "float32"  # float16 / bfloat16 halve the disk a large teacher's path takes
    switch_every: int = 100  # stage-2 steps on each target before moving one checkpoint toward the teacher

    def validate_path(self) -> None:
        if self.num_checkpoints < 1 or self.steps_per_checkpoint < 1 or self.switch_every < 1:
            raise ValueError("num_checkpoints, steps_per_checkpoint and switch_every must be >= 1")
        if self.path_dtype not in DTYPES:
            raise ValueError(f"path_dtype must be one of {', '.join(DTYPES)}, got {self.path_dtype!r}")
        if self.path_optimizer.lr <= 0:
            raise ValueError(f"path_optimizer.lr must be > 0, got {self.path_optimizer.lr}")


@dataclass
class DisBackOptions(BacktrackOptions, DMDOptions):
    """`options:` of a disback config (base: DMD2)."""

    def validate(self) -> None:
        DMDOptions.validate(self)
        self.validate_path()


@dataclass
class DisBackSiDOptions(BacktrackOptions, SiDOptions):
    """`options:` of a disback_sid config (base: SiD)."""

    def validate(self) -> None:
        SiDOptions.validate(self)
        self.validate_path()


def _save_state(unet: torch.nn.Module, path: Path, dtype: torch.dtype) -> None:
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in unet.state_dict().items()}
    with atomic_file(path) as f:
        f.write(save(state))


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes): which starting generator a path belongs to."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        value = value.detach().to("cpu").contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def record_degradation_path(distiller, options: BacktrackOptions, out_dir: Path) -> list[Path]:
    """Stage 1: [theta_0 = teacher, theta_1, ..., theta_N] as safetensors files (reused when already complete).

    theta_0 is saved in the teacher's own dtype so that the path ends on its exact weights. The path belongs to the
    starting generator: a folder recorded from other generator weights is refused, never reused.
    """
    settings = {"num_checkpoints": options.num_checkpoints, "steps_per_checkpoint": options.steps_per_checkpoint,
                "lr": options.path_optimizer.lr, "generator_timesteps": distiller.generator.timesteps,
                "batch_size": distiller.batch_size, "generator_sha256": weights_digest(distiller.generator.unet)}
    index = out_dir / PATH_INDEX
    if index.is_file():
        recorded = json.loads(index.read_text())
        if recorded["settings"] != settings:
            raise ValueError(f"{out_dir} holds a degradation path recorded with other settings "
                             f"({recorded['settings']}); choose another options.path_dir")
        return [out_dir / name for name in recorded["checkpoints"]]
    teacher = distiller.teacher
    start = time.perf_counter()
    names = ["checkpoint_00.safetensors"]
    _save_state(teacher.unet, out_dir / names[0], next(teacher.unet.parameters()).dtype)
    unet = copy.deepcopy(teacher.unet).float().train().requires_grad_(True)
    optimizer = make_optimizer(list(unet.parameters()), options.path_optimizer)
    raw = functools.partial(unet_forward, unet, schedule=teacher.schedule)
    for i in range(1, options.num_checkpoints + 1):
        for _ in range(options.steps_per_checkpoint):
            with torch.no_grad():
                x0, _, condition = distiller.draw(distiller.generator)
            loss = denoising_loss(raw, teacher.schedule, x0, condition)
            optimizer.zero_grad(set_to_none=True)
            loss.mean().backward()
            if options.path_optimizer.grad_clip:
                torch.nn.utils.clip_grad_norm_(unet.parameters(), options.path_optimizer.grad_clip)
            optimizer.step()
        names.append(f"checkpoint_{i:02d}.safetensors")
        _save_state(unet, out_dir / names[-1], DTYPES[options.path_dtype])
    write_json_atomic(index, {"settings": settings, "checkpoints": names,
                              "steps": options.num_checkpoints * options.steps_per_checkpoint,
                              "seconds": round(time.perf_counter() - start, 2)})
    return [out_dir / name for name in names]


def load_strict(unet: torch.nn.Module, checkpoint: Path) -> None:
    """Load a path checkpoint into `unet` (its own dtype), failing on any missing or unexpected key."""
    state = load_file(checkpoint, device=str(next(unet.parameters()).device))
    load_weights(unet, state, strict=True)


class Backtracking:
    """Mixin over a base distiller: the teacher seen by the base's losses is a moving target on the recorded path."""

    def __init__(self, teacher, options, *args, path_dir: Path | None = None, **kwargs):
        super().__init__(teacher, options, *args, **kwargs)  # generator and fake score start from the true teacher
        self.path_dir = Path(options.path_dir or path_dir or "path")
        self.path: list[Path] = []  # recorded by finalize(), once the generator holds its starting weights
        self.true_teacher = teacher
        self.target_index: int | None = None

    def finalize(self) -> None:
        """Record (or reuse) the path of the starting generator, start the fake score at its end, then LoRA."""
        self.path = record_degradation_path(self, self.options, self.path_dir)
        load_strict(self.fake.unet, self.path[-1])
        self.teacher = self.true_teacher.with_unet(copy.deepcopy(self.true_teacher.unet))  # the moving target
        super().finalize()

    def target_at(self, step: int) -> int:
        """Path index of the real score at `step`: N-1, N-2, ..., 0, one move every `switch_every` steps."""
        return max(len(self.path) - 2 - step // self.options.switch_every, 0)

    def begin_step(self, step: int) -> dict[str, float]:
        base = getattr(super(), "begin_step", None)  # DMD's (its lazy R1 counts steps); SiD has none
        logs = base(step) if base is not None else {}
        index = self.target_at(step)
        if index != self.target_index:
            load_strict(self.teacher.unet, self.path[index])
            self.target_index = index
        return {**logs, "disback/target_checkpoint": float(index)}


class DisBack(Backtracking, DMD):
    """DisBack over DMD2."""

    options_cls = DisBackOptions


class DisBackSiD(Backtracking, SiD):
    """DisBack over SiD."""

    options_cls = DisBackSiDOptions
