"""Teacher training (`method: teacher`): a pixel-space UNet learns to denoise the run's images, class-conditional on
the digits, unconditional on an image folder."""

from __future__ import annotations

from onestep.tasks.ingredients import build_judge, build_real, data_source, use_attention
from onestep.tasks.registry import RunSettings, TaskKind, register_task
from onestep.training.denoiser_task import DenoiserOptions, DenoiserTraining


def build_denoiser_task(cfg: RunSettings) -> DenoiserTraining:
    from onestep.data.digits import NUM_CLASSES

    num_classes = NUM_CLASSES if cfg.data.name == "digits" else None
    task = DenoiserTraining(cfg.options, num_classes, cfg.data.batch_size, build_judge(cfg, num_classes))
    task.real = build_real(cfg, task.teacher_view, None, data_source(cfg, task.teacher_view))
    use_attention(task, cfg.attention)
    return task


register_task(TaskKind("denoiser", methods=lambda: ("teacher",), options=lambda method: DenoiserOptions,
                       build=build_denoiser_task))
