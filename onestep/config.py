"""Typed run configs: YAML + `key=value` overrides parsed by OmegaConf into validated dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from onestep.errors import UserInputError
from onestep.models.attention import BACKENDS
from onestep.models.loading import DTYPES
from onestep.training.tracking import check_tracker
from onestep.training.trainer import TrainerConfig


@dataclass
class DataConfig:
    """Where real images, their captions/labels and the prompts to draw come from (onestep.data.real)."""

    # digits | digits_t2i (coloured captioned digits) | image_folder | dataset | prompts (no images: data-free methods)
    name: str = "digits"
    image_dir: str | None = None  # image_folder: image files + metadata.jsonl ({"file_name": ..., "text": ...})
    dataset: str | None = None  # dataset: a `save_to_disk` folder, or a dataset name in the local HF cache
    split: str = "train"  # dataset: the split to read
    image_column: str = "image"  # dataset: the column of the images
    caption_column: str = "text"  # each image's caption (text teachers); also the prompts, without data.prompts
    label_column: str = "label"  # each image's class (class-conditional teachers), if the dataset has one
    prompts: str | None = None  # text file, one prompt per line (text teachers): the prompts generators draw
    center_crop: bool = True  # resize the short side to the teacher's resolution, then center (else random) crop
    random_flip: bool = True  # flip each image horizontally with probability 1/2
    # DataLoader worker processes decoding images (0: in the training process; at most the CPU cores this process may
    # use, so a recipe's 8 runs as 2 on a 2-core machine)
    num_workers: int = 2
    # encode every image once with the teacher's VAE and train from the stored latents (onestep.data.latent_cache);
    # a folder inside output_dir, or one that already holds a complete cache of this dataset
    latent_cache: str | None = None
    latent_cache_dtype: str = "float16"  # float16 | bfloat16 | float32: the stored moments
    latent_cache_shard_size: int = 4096  # images per shard; a killed build goes on from its last complete shard
    batch_size: int = 64  # per process and per micro-batch (train.gradient_accumulation_steps)


@dataclass
class TeacherConfig:
    # a diffusers folder, a shipped teacher (builtin:digits, builtin:digits-t2i, builtin:digits-flow), or a Hub id
    # (owner/name) in the local Hugging Face cache (HF_HUB_CACHE / HF_HOME; never downloaded)
    path: str = "builtin:digits"
    # a single-file checkpoint as `path` (model.safetensors, original SD / SDXL layout): a diffusers folder (or cached
    # Hub id) of its model type whose configs, tokenizers and scheduler it loads with; nothing is downloaded
    config: str | None = None
    variant: str | None = None  # weights variant, e.g. fp16: loads *.fp16.safetensors
    revision: str | None = None  # Hub ids only: the cached branch, tag or commit (default main)
    guidance_scale: float = 1.0  # the teacher's classifier-free guidance (1 = none)
    allow_pickle: bool = False  # accept pickle (.bin) weights you trust
    # float16 / bfloat16 halve a large teacher's memory; generator and critics are float32 copies of those weights
    dtype: str = "float32"
    offload: bool = False  # keep the teacher's UNet in CPU memory, on the accelerator only during its calls


@dataclass
class EvalConfig:
    num_samples: int = 1000  # images the judge draws for the FD and metrics
    # the Fréchet distance's features: digits | inception | a registered network | none. A text teacher's samples
    # are not digits: with "digits" it is judged by `metrics` only (and its sample grid)
    features: str = "digits"
    reference: str = "digits"  # digits | STATS.npz (ours, pytorch-fid, clean-fid) | IMAGE_DIR
    sampling_batch: int = 500  # images per generator / feature-network call
    inception_weights: str | None = None  # FID network weights (.safetensors; a .pth needs allow_pickle)
    allow_pickle: bool = False  # accept a pickled (.pth) Inception file
    metrics: list[str] = field(default_factory=list)  # further metrics: clip_score, registered ones
    metric_options: dict[str, Any] = field(default_factory=dict)  # for registered metrics
    clip_model: str | None = None  # a local CLIP model folder for clip_score
    prompts: str | None = None  # text teachers: the eval prompt file (default data.prompts), cycled over N samples
    validation_prompts: Any = None  # text teachers: a list or a prompt file, a grid row each (default: 8 eval prompts)
    # the guidance of the teacher rows a student is compared with (`onestep bench`, scripts/t2i_table.py); null:
    # teacher.guidance_scale. A recipe may distill at another scale than the one its teacher samples best at (DMD2
    # on SD1.5: 1.75 vs 7.5), and the comparison should be with the teacher at its best
    teacher_guidance_scale: float | None = None


@dataclass
class RunConfig:
    method: str = MISSING  # teacher | vae | a distiller (dmd, dmd2, sid, ...)
    output_dir: str = MISSING  # the run folder: checkpoints, logs, metrics, pipeline
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    attention: str = "auto"  # auto | sdpa | xformers | eager: the attention kernel of all networks
    # Two-stage runs: an exported OneStepPipeline of an earlier stage whose generator starts this one ...
    init_generator: str | None = None
    # ... and an earlier run folder whose fake score (and GAN head, if it had one) continues as this run's critic, as
    # DMD2's GAN stage does; unset, the critics start from teacher.path
    init_critic: str | None = None
    options: Any = field(default_factory=dict)  # the method's own options, validated against its dataclass


def reference_guidance(cfg: dict) -> float:
    """The guidance of the teacher rows a run's student is compared with, from its saved config (a dict):
    eval.teacher_guidance_scale, else teacher.guidance_scale (configs saved before the field have only the latter)."""
    scale = cfg.get("eval", {}).get("teacher_guidance_scale")
    return cfg["teacher"]["guidance_scale"] if scale is None else scale


def method_options(method: str, data_name: str | None = None) -> type:
    """The options dataclass of a method name (`teacher`, `vae` or a registered distiller: onestep.tasks), on data
    `data_name` where a kind of task is specific to it."""
    from onestep.tasks import task_options

    return task_options(method, data_name)


def _one_line(err: Exception) -> str:
    """The first line of an OmegaConf error, prefixed with the offending key when OmegaConf knows it."""
    lines = str(err).strip().splitlines()
    msg = lines[0] if lines else type(err).__name__
    key = getattr(err, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


def _check_values(cfg: RunConfig) -> None:
    """Impossible values that types alone don't catch."""
    positive = {"data.batch_size": cfg.data.batch_size, "train.max_steps": cfg.train.max_steps,
                "train.log_every": cfg.train.log_every,
                "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
                "eval.num_samples": cfg.eval.num_samples,
                "eval.sampling_batch": cfg.eval.sampling_batch}
    non_negative = {"train.eval_every": cfg.train.eval_every, "train.sample_every": cfg.train.sample_every,
                    "train.checkpoint_every": cfg.train.checkpoint_every,
                    "train.keep_checkpoints": cfg.train.keep_checkpoints,
                    "train.progress_every_s": cfg.train.progress_every_s}
    for key, value in positive.items():
        if value <= 0:
            raise UserInputError(f"config {key} must be > 0, got {value}")
    for key, value in non_negative.items():
        if value < 0:
            raise UserInputError(f"config {key} must be >= 0, got {value}")
    from onestep.data.real import check_data_name

    check_data_name(cfg.data.name)
    if cfg.data.num_workers < 0:
        raise UserInputError(f"config data.num_workers must be >= 0, got {cfg.data.num_workers}")
    if cfg.data.latent_cache_dtype not in DTYPES:
        raise UserInputError(f"config data.latent_cache_dtype must be one of {', '.join(DTYPES)}, got "
                             f"{cfg.data.latent_cache_dtype!r}")
    if cfg.train.mixed_precision not in (None, "no", "fp16", "bf16"):
        raise UserInputError(f"config train.mixed_precision must be no, fp16 or bf16 (or unset: the launcher's), "
                             f"got {cfg.train.mixed_precision}")
    check_tracker(cfg.train.report_to)
    if cfg.teacher.dtype not in DTYPES:
        raise UserInputError(f"config teacher.dtype must be one of {', '.join(DTYPES)}, got {cfg.teacher.dtype!r}")
    if cfg.teacher.guidance_scale < 0:
        raise UserInputError(f"config teacher.guidance_scale must be >= 0, got {cfg.teacher.guidance_scale}")
    if cfg.eval.teacher_guidance_scale is not None and cfg.eval.teacher_guidance_scale < 0:
        raise UserInputError(f"config eval.teacher_guidance_scale must be >= 0, got {cfg.eval.teacher_guidance_scale}")
    if cfg.attention not in BACKENDS:
        raise UserInputError(f"config attention must be one of {', '.join(BACKENDS)}, got {cfg.attention!r}")
    from onestep.eval.features import FEATURES

    if cfg.eval.features not in (*FEATURES, "none"):
        raise UserInputError(f"config eval.features must be one of {', '.join([*FEATURES, 'none'])}, "
                             f"got {cfg.eval.features!r}")
    from onestep.eval.metrics import METRICS

    unknown = [m for m in cfg.eval.metrics if m not in METRICS]
    if unknown:
        raise UserInputError(f"config eval.metrics: unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    if "clip_score" in cfg.eval.metrics and not cfg.eval.clip_model:
        raise UserInputError("config eval.metrics has clip_score: set eval.clip_model to a local CLIP model folder")
    prompts = cfg.eval.validation_prompts
    if prompts is not None and not isinstance(prompts, str) and (
            not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts)):
        raise UserInputError("config eval.validation_prompts must be a prompt file or a list of non-empty prompts")


def load_config(path: str | Path, overrides: list[str] = (), options_schema: type | None = None) -> RunConfig:
    """Read a YAML run config, apply `key=value` overrides, validate types and values.

    `options_schema` is the method's options dataclass (by default `method_options(method)`); unknown or mistyped
    keys anywhere raise UserInputError.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"config file not found: {path}")
    try:
        source = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as err:
        raise UserInputError(f"bad config {path}: {_one_line(err)}") from None
    return config_from(source, overrides, options_schema, label=str(path))


def config_from(source: Any, overrides: list[str] = (), options_schema: type | None = None,
                label: str = "config") -> RunConfig:
    """A validated RunConfig from a dict / DictConfig (e.g. a run folder's saved config.json).

    An error that `source` alone does not have is blamed on the command line's overrides, not on `label`.
    """
    try:
        cfg = _merged(source, overrides, options_schema)
    except (OmegaConfBaseException, KeyError) as err:
        culprit = label
        if overrides:
            try:
                _merged(source, (), options_schema)
                culprit = "command-line override"
            except (OmegaConfBaseException, KeyError):
                pass
        message = _one_line(err) if isinstance(err, OmegaConfBaseException) else err.args[0]
        raise UserInputError(f"bad {culprit}: {message}") from None
    _check_values(cfg)
    check = getattr(cfg.options, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as err:
            raise UserInputError(f"bad {label}: options.{err}") from None
    return cfg


def _merged(source: Any, overrides: list[str], options_schema: type | None) -> RunConfig:
    layers = [OmegaConf.create(source), OmegaConf.from_dotlist(list(overrides))]
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), *map(_yaml_no_as_string, layers))
    if options_schema is None:
        options_schema = method_options(merged.method, merged.data.name)
    merged.options = OmegaConf.merge(OmegaConf.structured(options_schema), merged.options)
    return OmegaConf.to_object(merged)


def _yaml_no_as_string(layer):
    """YAML 1.1 reads `no` as false: `train.mixed_precision: no` (or `=no`) means the string "no"."""
    if OmegaConf.select(layer, "train.mixed_precision") is False:
        OmegaConf.update(layer, "train.mixed_precision", "no")
    return layer


def to_dict(cfg: Any) -> dict:
    """A plain, JSON-serialisable dict of a config dataclass."""
    if is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg
