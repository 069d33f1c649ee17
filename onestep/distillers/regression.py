"""DMD's paired regression loss: the generator matches the teacher's deterministic ODE output from the same noise."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from onestep.data.conditions import ConditionSampler
from onestep.files import atomic_file
from onestep.models.teacher import Teacher
from onestep.sampling.teacher import sample_teacher
from onestep.training.updates import LossOutput


DISTANCES = ("mse", "pseudo_huber", "lpips")


@dataclass
class RegressionOptions:
    weight: float = 0.0  # 0 turns the term off (DMD2); DMD1 uses 0.25
    distance: str = "mse"  # mse | pseudo_huber | lpips (LPIPS needs the `lpips` package and its weights on disk)
    num_pairs: int = 1000  # (noise, teacher sample) pairs drawn once
    teacher_steps: int = 50  # DDIM steps of the teacher's deterministic sampler
    batch_size: int = 16  # pairs per regression step
    # the teacher's guidance for the pairs; None: the real score's (`teacher.guidance_scale`), as in DMD. Another
    # scale lets the pairs come from the teacher's best sampling scale while the real score distils below it
    guidance_scale: float | None = None
    # an earlier run's pairs file (its OUTPUT_DIR/cache/regression-pairs-*.safetensors) to read instead of drawing
    # them again: it must have been drawn with this teacher, guidance, conditions and these num_pairs / teacher_steps
    pairs: str | None = None


def paired_regression(teacher: Teacher, conditions: ConditionSampler, options: RegressionOptions,
                      cache_dir: Path | None = None) -> PairedRegression | None:
    """The term when its weight is on (its pairs drawn or read now), else None."""
    return PairedRegression(teacher, conditions, options, cache_dir) if options.weight > 0 else None


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt(||a - b||^2 + c^2) - c per sample, c = 0.00054 sqrt(d) (Song & Dhariwal 2023, iCT)."""
    d = a[0].numel()
    c = 0.00054 * d**0.5
    return ((a - b).float().square().flatten(1).sum(1) + c**2).sqrt() - c


class PairedRegression:
    """(z, c, y) pairs with y = teacher's `teacher_steps`-step DDIM from z, built once and cached as safetensors."""

    def __init__(self, teacher: Teacher, conditions: ConditionSampler, options: RegressionOptions,
                 cache_dir: Path | None = None):
        if options.distance not in DISTANCES:
            raise ValueError(f"regression.distance must be one of {DISTANCES}, got {options.distance!r}")
        if options.guidance_scale is not None and len(conditions) == 0:
            raise ValueError("regression.guidance_scale needs a conditional teacher: an unconditional one has no "
                             "guidance to set (leave it null)")
        self.teacher, self.conditions, self.options = teacher, conditions, options
        self._lpips = self._load_lpips() if options.distance == "lpips" else None
        self.noise, self.index, self.targets = self._pairs(cache_dir)

    @staticmethod
    def _load_lpips():
        try:
            import lpips
        except ImportError:
            raise ValueError("regression.distance lpips needs `pip install lpips` with its backbone weights on "
                             "disk; use mse or pseudo_huber otherwise") from None
        return lpips.LPIPS(net="vgg").eval().requires_grad_(False)

    @property
    def guidance_scale(self) -> float:
        given = self.options.guidance_scale
        return self.teacher.guidance_scale if given is None else given

    def _key(self) -> str:
        """What the pairs depend on: the teacher (its weights' sum, guidance), the conditions and the sampler."""
        o, c = self.options, self.conditions
        listed = c.prompts if c.prompts is not None else (c.classes.tolist() if c.classes is not None else [])
        identity = {"num_pairs": o.num_pairs, "steps": o.teacher_steps, "shape": list(self.teacher.sample_shape),
                    "conditions": hashlib.sha256(json.dumps(listed).encode()).hexdigest(),
                    "guidance": self.guidance_scale,
                    "teacher": sum(float(p.double().sum()) for p in self.teacher.unet.parameters())}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def _pairs(self, cache_dir: Path | None):
        key = self._key()
        if self.options.pairs is not None:
            return self._read_given(Path(self.options.pairs), key)
        path = cache_dir / f"regression-pairs-{key}.safetensors" if cache_dir is not None else None
        if path is not None and path.is_file():
            data = load_file(path)
            return data["noise"], data["index"], data["targets"]
        rng = torch.Generator().manual_seed(0)
        n = self.options.num_pairs
        noise = torch.randn((n, *self.teacher.sample_shape), generator=rng)
        index = torch.randint(0, max(len(self.conditions), 1), (n,), generator=rng)
        condition = self.conditions.condition(index, self.teacher.device)
        targets = sample_teacher(self.teacher, condition, n, self.options.teacher_steps, "ddim", self.guidance_scale,
                                 noise=noise).cpu()
        if path is not None:
            with atomic_file(path) as f:
                f.write(save({"noise": noise, "index": index, "targets": targets},
                             metadata={"options": json.dumps(asdict(self.options)), "key": key}))
        return noise, index, targets

    @staticmethod
    def _read_given(path: Path, key: str):
        """`options.pairs`: read, never written, and refused unless drawn for what this run would draw."""
        if not path.is_file():
            raise ValueError(f"regression.pairs {path} is not a file (an earlier run's "
                             "OUTPUT_DIR/cache/regression-pairs-*.safetensors)")
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("key") != key:
                raise ValueError(f"regression.pairs {path} was drawn for another teacher, guidance, condition list, "
                                 "num_pairs or teacher_steps than this run's")
            return f.get_tensor("noise"), f.get_tensor("index"), f.get_tensor("targets")

    def loss(self, generator) -> torch.Tensor:
        """Mean distance between G(z_i, c_i) and y_i over a random minibatch of pairs (one-step read-out)."""
        pick = torch.randint(0, self.noise.shape[0], (self.options.batch_size,))
        device = self.teacher.device
        x = generator(self.noise[pick].to(device), self.conditions.condition(self.index[pick], device))
        y = self.targets[pick].to(device)
        if self.options.distance == "mse":
            return (x - y).square().flatten(1).mean(1).mean()
        if self.options.distance == "pseudo_huber":
            return pseudo_huber(x, y).mean()
        decode = self.teacher.decode
        x_img, y_img = decode(x), decode(y)
        if x_img.shape[1] == 1:
            x_img, y_img = x_img.repeat(1, 3, 1, 1), y_img.repeat(1, 3, 1, 1)
        return self._lpips(x_img, y_img).mean()

    def add_to(self, out: LossOutput, generator, scale: float = 1.0) -> LossOutput:
        """A generator loss plus weight x scale x this term (logged unweighted as `regression`); `scale` puts the
        per-element distance in the units of a loss that sums over elements (SiD's)."""
        loss = self.loss(generator)
        return LossOutput(out.loss + self.options.weight * scale * loss, {**out.logs, "regression": loss.item()})
