"""What every kind of task is built from: the teacher, the real data, the conditions it draws, its judge."""

from __future__ import annotations

from pathlib import Path

import torch

from onestep.errors import UserInputError
from onestep.models.loading import DTYPES, resolve_path
from onestep.tasks.registry import RunSettings
from onestep.training.trainer import process_state


def load_real_data(cfg: RunSettings) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """Images in [-1, 1] (N, C, H, W) held in memory, labels (or None) and the number of classes: the VAE and the
    digits_t2i teacher train on these; distillation and the denoiser's training stream them (`build_real`)."""
    if cfg.data.name == "digits":
        from onestep.data.digits import NUM_CLASSES, load_digits_tensors

        images, labels = load_digits_tensors()
        return images, labels, NUM_CLASSES
    if cfg.data.name == "image_folder":
        from onestep.data.folders import load_image_folder

        if not cfg.data.image_dir:
            raise UserInputError("data.name is image_folder but data.image_dir is not set")
        return load_image_folder(Path(cfg.data.image_dir)), None, None
    if cfg.data.name == "digits_t2i":
        from onestep.data.digits_t2i import coloured_digits

        images, digits, _ = coloured_digits()
        return images, digits, None
    raise UserInputError(f"data.name must be digits, digits_t2i or image_folder, got {cfg.data.name!r}")


def load_teacher(cfg: RunSettings):
    from onestep.models.teacher import Teacher

    return Teacher.from_pretrained(cfg.teacher.path, guidance_scale=cfg.teacher.guidance_scale,
                                   dtype=DTYPES[cfg.teacher.dtype], allow_pickle=cfg.teacher.allow_pickle,
                                   variant=cfg.teacher.variant, revision=cfg.teacher.revision,
                                   config=cfg.teacher.config)


def build_conditions(cfg: RunSettings, teacher, source=None):
    """The conditions a run draws: the teacher's classes, the prompt file's prompts (else the dataset's captions),
    or none."""
    from onestep.data.conditions import ConditionSampler

    prompts = None
    if cfg.data.prompts:
        from onestep.data.prompts import read_prompts

        prompts = read_prompts(Path(cfg.data.prompts))
    elif teacher.is_text and cfg.data.name == "digits_t2i":  # its captions, with their frequencies
        from onestep.data.digits_t2i import load_digits_t2i

        prompts = load_digits_t2i().captions
    elif teacher.is_text:
        if source is None:
            raise UserInputError("this teacher is text-conditional: set data.prompts to a prompt file (one per line) "
                                 "or use a captioned dataset (data.name image_folder or dataset)")
        prompts = source.captions()
    return ConditionSampler(classes=range(teacher.num_classes) if teacher.num_classes else None,
                            prompts=prompts, encode=teacher.encode_prompts if prompts else None)


def read_prompt_list(value: str | list[str] | None) -> list[str] | None:
    """A config value naming prompts: a prompt file (one per line) or a list of prompts."""
    from onestep.data.prompts import read_prompts

    if value is None or isinstance(value, list):
        return value
    return read_prompts(resolve_path(value))


def build_judge(cfg: RunSettings, num_classes: int | None, is_text: bool = False, forget: list[int] = (),
                captions: list[str] | None = None, forget_prompts: list[str] = ()):
    """The run's judge (`eval.*`): its metrics, reference and, for text teachers, its eval and grid prompts (by
    default the prompts the run draws: data.prompts, else the dataset's `captions`; for digits_t2i its fixed
    `eval_prompts(eval.num_samples)`, half of them naming no colour, and `validation_prompts()`)."""
    from onestep.eval.features import FeatureOptions
    from onestep.eval.judge import Judge
    from onestep.eval.metrics import MetricContext

    e = cfg.eval
    if not is_text and (e.prompts or e.validation_prompts):
        raise UserInputError("eval.prompts / eval.validation_prompts apply to text-to-image teachers; this one is "
                             f"{'class-conditional' if num_classes else 'unconditional'}")
    features = None if e.features == "none" or (is_text and e.features == "digits") else e.features
    prompts = validation = None
    if is_text:
        if cfg.data.name == "digits_t2i":
            from onestep.data.digits_t2i import eval_prompts, validation_prompts

            captions, validation = eval_prompts(e.num_samples)[0], validation_prompts()
        prompts = read_prompt_list(e.prompts or cfg.data.prompts) or captions
        validation = read_prompt_list(e.validation_prompts) or validation
    context = MetricContext(batch_size=e.sampling_batch, clip_model=e.clip_model, extra=dict(e.metric_options),
                            features=FeatureOptions(e.inception_weights, e.allow_pickle, dict(e.metric_options)))
    judge = Judge(e.num_samples, features, e.reference, num_classes, batch_size=e.sampling_batch,
                  forget_classes=list(forget), prompts=prompts, validation_prompts=validation, metrics=e.metrics,
                  context=context, forget_prompts=list(forget_prompts))
    judge.check()
    return judge


def data_source(cfg: RunSettings, teacher):
    """The run's captioned dataset (None for digits / prompts)."""
    if cfg.data.name not in ("image_folder", "dataset"):
        return None
    from onestep.data.real import DataSource

    return DataSource(cfg.data, teacher)


def build_real(cfg: RunSettings, teacher, conditions, source):
    """The real images a run reads (the GAN's real branch, TSM), each with its own caption or label."""
    from onestep.data.real import real_images

    cache = cfg.data.latent_cache
    check_writes_inside(cfg, cache, "data.latent_cache")
    caption_condition = conditions.encode if conditions is not None and teacher.is_text else None
    return real_images(cfg.data, teacher, caption_condition,
                       seed=cfg.train.seed, cache_dir=Path(cache) if cache else None, source=source)


def check_writes_inside(cfg: RunSettings, folder: str | None, key: str = "options.path_dir") -> None:
    """A config value may name a folder onestep would write to: only inside output_dir, unless it already holds a
    complete DisBack path or latent cache (read, never written)."""
    from onestep.data.latent_cache import INDEX
    from onestep.distillers.disback import PATH_INDEX

    if folder is None or (Path(folder) / PATH_INDEX).is_file() or (Path(folder) / INDEX).is_file():
        return
    if not Path(folder).resolve().is_relative_to(Path(cfg.output_dir).resolve()):
        raise UserInputError(f"{key} {folder} is outside output_dir {cfg.output_dir} and holds no complete "
                             "recorded data; onestep writes only inside output_dir (point it at an existing one to "
                             "reuse it)")


def use_attention(task, backend: str) -> None:
    """Run every attention layer of the task's networks on `backend`, chosen for the device accelerate will train on
    (the networks are still on the CPU here); the trainer's log states the backend (`task.attention_backend`)."""
    from onestep.models.attention import set_task_attention_backend

    task.attention_backend = set_task_attention_backend(task, backend, process_state().device.type)
