"""The task registry: each kind of run (distillation, teacher training, VAE training) registers the config methods
it serves, the data it is for, its options and how it builds its task; the config loader and runs.py look them up
here instead of branching on `cfg.method` / `cfg.data.name`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from onestep.errors import UserInputError


class RunSettings(Protocol):
    """What a task builder reads of a run: an `onestep.config.RunConfig`. Typed by its shape so that the tasks sit
    below the config loader, which asks this registry for a method's options."""

    method: str
    output_dir: str
    data: Any  # DataConfig
    teacher: Any  # TeacherConfig
    train: Any  # TrainerConfig
    eval: Any  # EvalConfig
    attention: str
    init_generator: str | None
    init_critic: str | None
    options: Any  # the method's options dataclass


@dataclass(frozen=True)
class TaskKind:
    """One kind of training task.

    `methods()` names the config methods it serves; `data` the `data.name` values it is specific to (None: any data;
    a kind for the method and the run's data wins over a kind for any data); `options(method)` is the options
    dataclass a config's `options:` is validated against; `build(cfg)` returns the trainer's task (its networks, its
    data and its judge).
    """

    name: str
    methods: Callable[[], Iterable[str]]
    options: Callable[[str], type]
    build: Callable[[RunSettings], Any]
    data: tuple[str, ...] | None = None


TASK_KINDS: list[TaskKind] = []


def register_task(kind: TaskKind) -> TaskKind:
    """Add a kind of task (a kind of the same name is replaced)."""
    TASK_KINDS[:] = [k for k in TASK_KINDS if k.name != kind.name]
    TASK_KINDS.append(kind)
    return kind


def method_names() -> list[str]:
    return sorted({m for kind in TASK_KINDS for m in kind.methods()})


def _serving(method: str) -> list[TaskKind]:
    kinds = [kind for kind in TASK_KINDS if method in kind.methods()]
    if not kinds:
        raise UserInputError(f"unknown method {method!r}; choose from {', '.join(method_names())}")
    return kinds


def task_options(method: str, data_name: str | None = None) -> type:
    """The options dataclass of a config method (on data `data_name`, when the kinds differ by data)."""
    kind = task_kind(method, data_name) if data_name is not None else _serving(method)[0]
    return kind.options(method)


def task_kind(method: str, data_name: str) -> TaskKind:
    """The kind that builds a run of `method` on data `data_name`: the one specific to that data, else the general
    one."""
    kinds = _serving(method)
    for kind in kinds:
        if kind.data is not None and data_name in kind.data:
            return kind
    for kind in kinds:
        if kind.data is None:
            return kind
    raise UserInputError(f"method {method} does not train on data.name {data_name}; it takes "
                         f"{', '.join(d for kind in kinds for d in kind.data)}")
