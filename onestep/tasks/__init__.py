"""The kinds of training task a run config can name, each registered by its own module (a new method or teacher
family is a new module here, listed below); `task_kind` picks the one for a config, `task_options` validates its
`options:`."""

from onestep.tasks import denoiser, distillation, text_denoiser, vae  # noqa: F401  (each registers its kind)
from onestep.tasks.registry import RunSettings, TaskKind, method_names, register_task, task_kind, task_options


__all__ = ["RunSettings", "TaskKind", "method_names", "register_task", "task_kind", "task_options"]
