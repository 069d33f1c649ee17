"""From a validated RunConfig to a running Trainer: which method, which teacher, which data, which judge."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.utils import set_seed

from onestep.config import RunConfig, config_from, to_dict
from onestep.errors import UserInputError
from onestep.export.model_card import write_model_card
from onestep.files import read_json, write_json_atomic
from onestep.models.loading import DTYPES, resolve_path
from onestep.training.denoiser_task import DenoiserTraining
from onestep.training.trainer import Trainer, process_state


def load_real_data(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
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


# what makes two configs the same run (not its length)
IDENTITY_KEYS = ("method", "data", "teacher", "init_generator", "init_critic", "options")
RUN_CONFIG = "config.json"


def is_main_process() -> bool:
    """Whether this process writes the run's files: the only one, or the first of an `accelerate launch` / `torchrun`
    (the others compute the same run and must not race it on disk)."""
    return process_state().is_main_process


def with_current_defaults(saved: dict) -> dict:
    """A saved config.json as today's code reads it: settings added since it was written take their defaults, so
    that a run started by older code still resumes (as itself, not as a different run)."""
    try:
        return to_dict(config_from(saved, label=RUN_CONFIG))
    except UserInputError:
        return saved


def check_output_dir(cfg: RunConfig, overwrite: bool = False) -> None:
    """Refuse to resume into / overwrite an output folder that holds a different run, unless told to.

    With `overwrite` the run starts over: the folder's old checkpoints are removed (nothing else is touched).
    """
    out = Path(cfg.output_dir)
    saved = out / RUN_CONFIG
    if overwrite:
        import shutil

        if is_main_process():
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        return
    if not out.exists():
        return
    if not saved.is_file():
        # a run killed while building its latent cache has left only that (config.json comes after the build)
        cache = Path(cfg.data.latent_cache).resolve() if cfg.data.latent_cache else None
        if any(entry.resolve() != cache for entry in out.iterdir()):
            raise UserInputError(f"output_dir {out} is not empty and holds no onestep run; pass --overwrite to use it")
        return
    try:
        previous = json.loads(saved.read_text())
    except ValueError:  # not JSON, not UTF-8
        raise UserInputError(f"output_dir {out} has a corrupt {RUN_CONFIG}; pass --overwrite to replace it") from None
    previous, current = with_current_defaults(previous), to_dict(cfg)
    changed = [k for k in IDENTITY_KEYS if previous.get(k) != current.get(k)]
    if changed:
        raise UserInputError(f"output_dir {out} belongs to a different run (its {', '.join(changed)} differ); "
                             "choose another output_dir or pass --overwrite")


def load_teacher(cfg: RunConfig):
    from onestep.models.teacher import Teacher

    return Teacher.from_pretrained(cfg.teacher.path, guidance_scale=cfg.teacher.guidance_scale,
                                   dtype=DTYPES[cfg.teacher.dtype], allow_pickle=cfg.teacher.allow_pickle,
                                   variant=cfg.teacher.variant, revision=cfg.teacher.revision)


def build_conditions(cfg: RunConfig, teacher, source=None):
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


def build_judge(cfg: RunConfig, num_classes: int | None, is_text: bool = False, forget: list[int] = (),
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


def data_source(cfg: RunConfig, teacher):
    """The run's captioned dataset (None for digits / prompts)."""
    if cfg.data.name not in ("image_folder", "dataset"):
        return None
    from onestep.data.real import DataSource

    return DataSource(cfg.data, teacher)


def build_real(cfg: RunConfig, teacher, conditions, source):
    """The real images a run reads (the GAN's real branch, TSM), each with its own caption or label."""
    from onestep.data.real import real_images

    cache = cfg.data.latent_cache
    _check_writes_inside(cfg, cache, "data.latent_cache")
    caption_condition = conditions.encode if conditions is not None and teacher.is_text else None
    return real_images(cfg.data, teacher, caption_condition,
                       seed=cfg.train.seed, cache_dir=Path(cache) if cache else None, source=source)


def _check_writes_inside(cfg: RunConfig, folder: str | None, key: str = "options.path_dir") -> None:
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


def build_distiller_task(cfg: RunConfig):
    from onestep.distillers import DISTILLERS, build_distiller
    from onestep.distillers.disback import Backtracking

    teacher = load_teacher(cfg)
    source = data_source(cfg, teacher)
    conditions = build_conditions(cfg, teacher, source)
    real = build_real(cfg, teacher, conditions, source)
    forget_prompts = list(getattr(cfg.options, "forget_prompts", []))
    forget = list(getattr(cfg.options, "forget", [])) if not forget_prompts else []
    judge = build_judge(cfg, teacher.num_classes, teacher.is_text, forget, conditions.prompts, forget_prompts)
    extra = {}
    if getattr(cfg.options, "override", None) == "classifier":
        from onestep.eval.classifier import load_digits_classifier

        extra["classifier"] = load_digits_classifier().to(teacher.device)  # pseudo-labels for SFD's override
    distiller_cls = DISTILLERS[cfg.method].distiller_cls
    if issubclass(distiller_cls, Backtracking):
        extra["path_dir"] = Path(cfg.output_dir) / "path"  # DisBack's stage-1 path, unless options.path_dir is set
        _check_writes_inside(cfg, cfg.options.path_dir)
    init_generator = resolve_path(cfg.init_generator) if cfg.init_generator else None
    init_critic = critic_file(resolve_path(cfg.init_critic)) if cfg.init_critic else None
    try:
        distiller = build_distiller(cfg.method, teacher, cfg.options, conditions=conditions, judge=judge,
                                    batch_size=cfg.data.batch_size, real=real,
                                    regression_cache=Path(cfg.output_dir) / "cache",
                                    init_generator=init_generator, init_critic=init_critic, **extra)
    except ValueError as err:
        raise UserInputError(str(err)) from None
    use_attention(distiller, cfg.attention)
    return distiller


def critic_file(run_dir: Path) -> Path:
    """The fake score's weights in a run folder's newest complete checkpoint (a later stage's `init_critic`).

    The trainer saves its updates' modules in order (accelerate's model.safetensors, model_1.safetensors, ...);
    every distiller with a fake score (DMD/DMD2, MSD, SiD, SFD, DisBack) lists the generator first, the critic second.
    """
    from onestep.distillers import DISTILLERS
    from onestep.distillers.dmd import DMD
    from onestep.distillers.sid import SiD
    from onestep.training.checkpoints import latest_checkpoint

    saved = run_dir / "config.json"
    if not saved.is_file():
        raise UserInputError(f"init_critic {run_dir} is not a onestep run folder (no config.json)")
    method = read_json(saved).get("method")
    if method not in DISTILLERS or not issubclass(DISTILLERS[method].distiller_cls, (DMD, SiD)):
        raise UserInputError(f"init_critic {run_dir}: a {method} run has no fake score to continue")
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None or not (checkpoint / "model_1.safetensors").is_file():
        raise UserInputError(f"init_critic {run_dir} has no complete checkpoint")
    return checkpoint / "model_1.safetensors"


def use_attention(task, backend: str) -> None:
    """Run every attention layer of the task's networks on `backend`, chosen for the device accelerate will train on
    (the networks are still on the CPU here); the trainer's log states the backend (`task.attention_backend`)."""
    from onestep.models.attention import set_task_attention_backend

    task.attention_backend = set_task_attention_backend(task, backend, process_state().device.type)


def train(cfg: RunConfig, overwrite: bool = False) -> dict:
    """Train a run to its end; an msd config without `options.student` trains every student, one after another."""
    if cfg.method == "msd" and cfg.options.student is None:
        return train_students(cfg, overwrite)
    return build_trainer(cfg, overwrite).train()


def student_config(cfg: RunConfig, k: int) -> RunConfig:
    """Student k's own run: OUTPUT_DIR/student_k, the same options with `student` = k.

    An `init_generator` / `init_critic` that is an earlier all-students msd run (a folder holding `student_k/`:
    stage 1 before the GAN stage) starts student k from that run's student k; any other (one single-student run on
    the whole condition set: MSD's warm start) starts every student from the same weights.
    """
    import copy

    sub = copy.deepcopy(cfg)
    sub.output_dir = str(Path(cfg.output_dir) / f"student_{k}")
    sub.options.student = k
    if cfg.init_generator and (Path(cfg.init_generator) / f"student_{k}").is_dir():
        sub.init_generator = str(Path(cfg.init_generator) / f"student_{k}" / "pipeline")
    if cfg.init_critic and (Path(cfg.init_critic) / f"student_{k}").is_dir():
        sub.init_critic = str(Path(cfg.init_critic) / f"student_{k}")
    return sub


def train_students(cfg: RunConfig, overwrite: bool = False) -> dict:
    """MSD's students one after another (each resumable in its own folder), then the assembled pipeline.

    `train.max_steps` / `train.max_minutes` apply to each student; OUTPUT_DIR/metrics.json sums their cost.
    """
    check_output_dir(cfg, overwrite)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_json_atomic(out / RUN_CONFIG, to_dict(cfg))
    students = []
    for k in range(cfg.options.num_students):
        sub = student_config(cfg, k)
        final = build_trainer(sub, overwrite).train()
        if "interrupted" in final:
            return {**final, "student": k}
        students.append(json.loads((Path(sub.output_dir) / "metrics.json").read_text()))
    pipeline = out / "pipeline"
    metrics = {"step": sum(m["step"] for m in students), "train_seconds": sum(m["train_seconds"] for m in students),
               "students": [{"step": m["step"], "train_seconds": m["train_seconds"], "final": m["final"]}
                            for m in students], "history": []}
    if is_main_process():
        assemble_students(cfg, pipeline)
        write_json_atomic(out / "metrics.json", metrics)
        write_model_card(pipeline, to_dict(cfg), metrics)
    return {"pipeline": str(pipeline), "step": metrics["step"], "train_seconds": metrics["train_seconds"]}


def assemble_students(cfg: RunConfig, out: Path | None = None) -> Path:
    """One MultiStudentPipeline from the students' exported pipelines and the run's router."""
    from onestep.distillers.msd import build_router
    from onestep.export.pipeline import export_students
    from onestep.models.loading import load_model

    teacher = load_teacher(cfg)
    router = build_router(cfg.options, teacher, build_conditions(cfg, teacher, data_source(cfg, teacher)))
    folders = [Path(student_config(cfg, k).output_dir) / "pipeline" for k in range(cfg.options.num_students)]
    missing = [str(f) for f in folders if not (f / "model_index.json").is_file()]
    if missing:
        raise UserInputError(f"student pipeline missing: {missing[0]} (train that student first)")
    unets = [load_model(f / "unet") for f in folders]
    return export_students(unets, teacher, router, cfg.options.generator_timesteps,
                           out or Path(cfg.output_dir) / "pipeline")


def build_trainer(cfg: RunConfig, overwrite: bool = False) -> Trainer:
    check_output_dir(cfg, overwrite)
    set_seed(cfg.train.seed)  # building a task may draw random numbers too (DisBack records its path)
    # what a task writes while it is built (DisBack's path, the regression pairs) is written once: the main process
    # builds first, the others then find the files complete and read them
    with process_state().main_process_first():
        if cfg.method == "vae":
            from onestep.training.vae_task import VaeTraining

            task = VaeTraining(cfg.options, load_real_data(cfg)[0], cfg.data.batch_size)
        elif cfg.method == "teacher" and cfg.data.name == "digits_t2i":
            from onestep.data.digits_t2i import digits_t2i_tokenizer, load_digits_t2i
            from onestep.training.text_denoiser_task import TextDenoiserTraining

            data = load_digits_t2i()
            try:
                task = TextDenoiserTraining(cfg.options, data.images, data.captions, cfg.data.batch_size,
                                            digits_t2i_tokenizer(), build_judge(cfg, None, is_text=True))
            except ValueError as err:
                raise UserInputError(str(err)) from None
            use_attention(task, cfg.attention)
        elif cfg.method == "teacher":
            from onestep.data.digits import NUM_CLASSES

            num_classes = NUM_CLASSES if cfg.data.name == "digits" else None
            task = DenoiserTraining(cfg.options, num_classes, cfg.data.batch_size, build_judge(cfg, num_classes))
            task.real = build_real(cfg, task.teacher_view, None, data_source(cfg, task.teacher_view))
            use_attention(task, cfg.attention)
        else:
            task = build_distiller_task(cfg)
    if cfg.teacher.offload and hasattr(task, "teacher"):
        if getattr(task, "shares_base", None) and task.shares_base(critic=False):
            raise UserInputError("teacher.offload moves the teacher's weights off the accelerator between its calls, "
                                 "but with options.lora.share_base they are the LoRA networks' base too: set "
                                 "options.lora.share_base=false")
        task.teacher.offload(process_state().device)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_json_atomic(Path(cfg.output_dir) / RUN_CONFIG, to_dict(cfg))
    return Trainer(task, cfg.output_dir, cfg.train, run_config=to_dict(cfg))


def export_run(run_dir: Path, out: Path | None = None) -> Path:
    """Rebuild a run from its saved config, load its newest checkpoint and export the pipeline (EMA weights)."""
    saved = run_dir / RUN_CONFIG
    if not saved.is_file():
        raise UserInputError(f"{run_dir} is not a onestep run folder (no {RUN_CONFIG})")
    cfg = config_from(read_json(saved), label=str(saved))
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):  # none yet (an interrupted run), or unreadable: a card without metrics
        metrics = None
    metrics = metrics if isinstance(metrics, dict) else None
    if cfg.method == "msd" and cfg.options.student is None:
        out = assemble_students(cfg, out)
    else:
        trainer = build_trainer(cfg)
        if not trainer.resume():
            raise UserInputError(f"{run_dir} has no complete checkpoint to export")
        out = out or run_dir / "pipeline"
        with trainer.ema_weights():
            trainer.task.export_pipeline(out)
        if metrics is not None and metrics.get("step") != trainer.step:
            metrics = None  # measured at another step than the checkpoint exported
    write_model_card(out, to_dict(cfg), metrics)
    return out
