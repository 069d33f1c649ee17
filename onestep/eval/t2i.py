"""Scoring the digits text-to-image teacher and its students on the fixed evaluation prompts (`eval_prompts`):
FD-t2i, digit accuracy, colour accuracy, colour balance, images/s."""

from __future__ import annotations

import time

import torch

from onestep.conditioning import Condition
from onestep.eval.quantize import to_uint8
from onestep.teacher import Teacher


PROTOCOL = ("digits-t2i: N samples from fixed noise (seed {seed}) on eval_prompts(N) (half coloured, half "
            "uncoloured); classifier onestep/assets/digits_t2i_classifier; FD-t2i against all 7188 real images")


def score_t2i(images: torch.Tensor, digits: torch.Tensor, colours: torch.Tensor) -> dict[str, float]:
    """The four numbers of uint8 (N, 3, 32, 32) images made for prompts asking for `digits` / `colours` (-1: none)."""
    from onestep.eval.t2i_classifier import classify, fd_t2i, load_t2i_classifier, prompt_metrics

    pred_digits, pred_colours = classify(load_t2i_classifier(), images)
    return {"fd_t2i": fd_t2i(images), **prompt_metrics(pred_digits, pred_colours, digits, colours)}


def _prompts(teacher: Teacher, n: int):
    from onestep.data.digits_t2i import eval_prompts

    prompts, digits, colours = eval_prompts(n)
    return teacher.condition(prompts=prompts), digits, colours


@torch.no_grad()
def teacher_t2i_metrics(teacher: Teacher, steps: int, guidance_scale: float, num_samples: int = 1000,
                        seed: int = 1234, batch_size: int = 500) -> dict[str, float]:
    """The teacher's numbers with `steps` guided DDIM steps (2 UNet calls per step when guidance_scale != 1)."""
    from onestep.sampling import sample_teacher

    condition, digits, colours = _prompts(teacher, num_samples)
    start = time.perf_counter()
    latents = sample_teacher(teacher, condition, num_samples, steps, guidance_scale=guidance_scale,
                             generator=torch.Generator(teacher.device).manual_seed(seed), batch_size=batch_size)
    images = to_uint8(teacher.decode(latents).clamp(-1, 1))
    elapsed = time.perf_counter() - start
    return {**score_t2i(images, digits, colours), "images_per_s": num_samples / elapsed}


@torch.no_grad()
def generator_t2i_metrics(generator, teacher: Teacher, num_samples: int = 1000, seed: int = 1234,
                          batch_size: int = 500) -> dict[str, float]:
    """A one-step (or few-step) generator's numbers, `generator.sample(noise, condition)` in model space."""
    condition, digits, colours = _prompts(teacher, num_samples)
    rng = torch.Generator(teacher.device).manual_seed(seed)
    start, out = time.perf_counter(), []
    for i in range(0, num_samples, batch_size):
        m = min(batch_size, num_samples - i)
        noise = torch.randn((m, *teacher.sample_shape), generator=rng, device=teacher.device)
        cond: Condition = condition[i:i + m]
        out.append(teacher.decode(generator.sample(noise, cond, generator=rng)).clamp(-1, 1))
    images = to_uint8(torch.cat(out))
    elapsed = time.perf_counter() - start
    return {**score_t2i(images, digits, colours), "images_per_s": num_samples / elapsed}


class T2IJudge:
    """The judge of distillation runs on a digits text-to-image teacher (what `Judge` is for class teachers)."""

    def __init__(self, num_samples: int = 1000, seed: int = 1234, batch_size: int = 500):
        self.num_samples, self.seed, self.batch_size = num_samples, seed, batch_size

    @property
    def protocol(self) -> str:
        return PROTOCOL.format(seed=self.seed).replace("N samples", f"N={self.num_samples} samples")

    def generator_metrics(self, generator, teacher: Teacher) -> dict:
        metrics = generator_t2i_metrics(generator, teacher, self.num_samples, self.seed, self.batch_size)
        return {f"{k}/student": v for k, v in metrics.items()} | {"protocol": self.protocol}

    def teacher_metrics(self, teacher: Teacher, steps: list[int], guidance_scale: float | None = None) -> dict:
        scale = teacher.guidance_scale if guidance_scale is None else guidance_scale
        out = {}
        for k in steps:
            metrics = teacher_t2i_metrics(teacher, k, scale, self.num_samples, self.seed, self.batch_size)
            out.update({f"{name}/teacher_ddim{k}": v for name, v in metrics.items()})
        return out | {"protocol": self.protocol}

    @torch.no_grad()
    def generator_grid(self, generator, teacher: Teacher) -> torch.Tensor:
        """One row per digit: its four coloured prompts, then four samples of the uncoloured prompt."""
        from onestep.data.digits_t2i import grid_prompts

        condition = teacher.condition(prompts=grid_prompts())
        rng = torch.Generator(teacher.device).manual_seed(self.seed)
        noise = torch.randn((condition.encoder_hidden_states.shape[0], *teacher.sample_shape), generator=rng,
                            device=teacher.device)
        return to_uint8(teacher.decode(generator.sample(noise, condition, generator=rng)).clamp(-1, 1))
