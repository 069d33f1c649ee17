"""Reading diffusers folders safely: safetensors only unless pickle is explicitly allowed, one-line errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from onestep.errors import UserInputError
from onestep.files import read_json


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
ASSETS = Path(__file__).parent.parent / "assets"
# the shipped teachers: class-conditional DDPM UNet, miniature Stable Diffusion, miniature SD3 (flow transformer)
BUILTIN = {"builtin:digits": ASSETS / "digits_teacher",
           "builtin:digits-t2i": ASSETS / "digits_t2i_teacher",
           "builtin:digits-flow": ASSETS / "digits_flow_teacher"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name
# the (text encoder, tokenizer) subfolders of a diffusers folder: SD 1.x/2.x have the first, SDXL and FLUX two, SD3
# three (its T5 optional)
TEXT_PARTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))
# the flow-transformer pipelines a teacher folder may be (their denoiser lives in transformer/, not unet/)
FLOW_TEACHERS = ("StableDiffusion3Pipeline", "FluxPipeline")


# the weight dtypes a config may name (teacher.dtype, DisBack's path_dtype)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """The from_pretrained keyword for a load dtype: diffusers 0.40 renamed `torch_dtype=` to `dtype=`."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.40") else "torch_dtype": dtype}


def resolve_path(path: str | os.PathLike) -> Path:
    """`builtin:NAME` names a shipped teacher (BUILTIN); anything else is a filesystem path."""
    if str(path).startswith("builtin:") and str(path) not in BUILTIN:
        raise UserInputError(f"unknown builtin teacher {path}; the builtins are {', '.join(BUILTIN)}")
    return BUILTIN.get(str(path), Path(path))


def resolve_model(path: str | os.PathLike, revision: str | None = None) -> Path:
    """The folder of a model: a builtin (`builtin:digits`, `builtin:digits-t2i`, `builtin:digits-flow`), a local
    folder, or a Hub id (`owner/name`) already in the local Hugging Face cache (`HF_HUB_CACHE`, or `HF_HOME/hub`),
    at `revision` (a branch, tag or commit; default main).

    Nothing is downloaded (`local_files_only`), so this works offline (`HF_HUB_OFFLINE=1`) and a run never fetches
    gigabytes behind the user's back: a Hub id not in the cache is one error naming the download command.
    """
    local = resolve_path(path)
    if local.exists() or not HUB_ID.fullmatch(str(path)):
        if revision is not None:
            raise UserInputError(f"a revision ({revision}) applies to Hub ids, not to the local path {path}")
        return local
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(path), revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        at = f" at revision {revision}" if revision else ""
        option = f" --revision {revision}" if revision else ""
        raise UserInputError(f"{path} is neither a folder nor a Hub model in the local Hugging Face cache{at} "
                             f"({constants.HF_HUB_CACHE}); download it first: hf download {path}{option}") from None


def check_weights(folder: Path, allow_pickle: bool = False) -> None:
    """Refuse a model folder whose weights are pickle-only (arbitrary code on load) unless allowed."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickled and not allow_pickle:
        raise UserInputError(f"{folder} holds only pickle weights ({pickled[0]}); convert them to safetensors "
                             "or pass --allow-pickle if you trust the file")
    if not pickled:
        raise UserInputError(f"{folder} holds no weights (*.safetensors)")


def weight_variants(folder: Path) -> set[str | None]:
    """The variants of a folder's safetensors weights: "fp16" for `model.fp16.safetensors` (or its shards
    `model.fp16-00001-of-00002.safetensors`), None for the default `model.safetensors`."""
    found = set()
    for file in folder.glob("*.safetensors"):
        parts = file.name.removesuffix(".safetensors").split(".")
        found.add(re.sub(r"-\d+-of-\d+$", "", parts[1]) if len(parts) > 1 else None)
    return found


def load_model(folder: Path, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
               variant: str | None = None):
    """A diffusers model (class named in its config.json) from a local folder (`variant`: `*.{variant}.safetensors`
    weights, e.g. "fp16")."""
    import diffusers

    if not folder.is_dir():
        raise UserInputError(f"model folder not found: {folder}")
    class_name = read_json(folder / "config.json").get("_class_name")
    model_cls = getattr(diffusers, str(class_name), None)
    if model_cls is None:
        raise UserInputError(f"{folder}/config.json names an unknown diffusers model class {class_name!r}")
    check_weights(folder, allow_pickle)
    try:
        model = model_cls.from_pretrained(folder, use_safetensors=None if allow_pickle else True, variant=variant,
                                          **dtype_kwargs(dtype))
    except Exception as err:  # diffusers raises many types for truncated/corrupt files
        raise UserInputError(f"cannot load {folder}: {str(err).splitlines()[0]}") from None
    return model


def load_text_encoder(folder: Path, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                      variant: str | None = None):
    """A transformers text encoder (the class in its config's `architectures`: CLIPTextModel, or SDXL's
    CLIPTextModelWithProjection) from a local folder."""
    import transformers

    check_weights(folder, allow_pickle)
    architecture = (read_json(folder / "config.json").get("architectures") or ["CLIPTextModel"])[0]
    encoder_cls = getattr(transformers, str(architecture), None)
    if encoder_cls is None:
        raise UserInputError(f"{folder}/config.json names an unknown transformers class {architecture!r}")
    try:
        return encoder_cls.from_pretrained(folder, use_safetensors=None if allow_pickle else True, variant=variant,
                                           dtype=dtype)
    except Exception as err:  # transformers raises many types for truncated/corrupt files
        raise UserInputError(f"cannot load {folder}: {str(err).splitlines()[0]}") from None


def load_tokenizer(folder: Path):
    import transformers

    if not folder.is_dir():
        raise UserInputError(f"missing tokenizer folder {folder} (the text encoder beside it needs it)")
    try:
        return transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # a missing vocab or a corrupt file
        raise UserInputError(f"cannot load tokenizer {folder}: {str(err).splitlines()[0]}") from None


def load_scheduler(folder: Path):
    import diffusers

    config = read_json(folder / "scheduler_config.json")
    scheduler_cls = getattr(diffusers, str(config.get("_class_name")), None)
    if scheduler_cls is None or not hasattr(scheduler_cls, "from_config"):
        raise UserInputError(f"{folder} names an unknown scheduler class {config.get('_class_name')!r}")
    return scheduler_cls.from_config(config)


def check_added_conditions(parts: dict, path: Path) -> None:
    """An SDXL-style UNet ("text_time" added embedding) needs a second, projecting text encoder for the pooled
    embedding, and the 6 time ids of SDXL base (a refiner's aesthetic-score ids are not supported)."""
    cfg = parts["unet"].config
    if getattr(cfg, "addition_embed_type", None) != "text_time":
        return
    encoder = parts.get("text_encoder_2")
    if encoder is None or parts.get("text_encoder") is None:
        raise UserInputError(f"{path}: its UNet takes SDXL's pooled text embedding; the folder needs text_encoder/ "
                             "and text_encoder_2/ (SDXL base layout)")
    num_ids = (cfg.projection_class_embeddings_input_dim - encoder.config.projection_dim) / cfg.addition_time_embed_dim
    if num_ids != 6:
        raise UserInputError(f"{path}: its UNet takes {num_ids:g} time ids; onestep conditions on SDXL base's 6 "
                             "(original size, crop, target size), not a refiner's aesthetic score")


def denoiser_folder(path: Path) -> str:
    """`unet`, or `transformer` for the flow pipelines onestep takes (StableDiffusion3Pipeline, FluxPipeline); any
    other transformer pipeline is refused with one line."""
    if not (path / "transformer").is_dir() or (path / "unet").is_dir():
        return "unet"
    index = read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    name = index.get("_class_name")
    if name not in FLOW_TEACHERS:
        raise UserInputError(f"{path}: {name or 'this transformer pipeline'} is not supported as a teacher; onestep "
                             f"takes UNet folders and the flow transformers of {' and '.join(FLOW_TEACHERS)}")
    return "transformer"


def load_diffusers_folder(path: Path, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                          variant: str | None = None) -> dict:
    """unet (or a flow pipeline's transformer, under the same key) + scheduler (+ vae, text encoders and
    tokenizers when present) of a standard diffusers folder, in `dtype` as a diffusers pipeline loaded with it would
    be, and `force_zeros_for_empty_prompt` from its `model_index.json` (SDXL's unconditional embedding)."""
    if not path.is_dir():
        raise UserInputError(f"teacher folder not found: {path}")
    denoiser = denoiser_folder(path)
    for needed in (denoiser, "scheduler"):
        if not (path / needed).is_dir():
            raise UserInputError(f"{path} is not a diffusers model folder: no {needed}/ subfolder")
    if variant is not None and not any(variant in weight_variants(sub) for sub in path.iterdir() if sub.is_dir()):
        raise UserInputError(f"{path} has no weights of variant {variant!r} (files named *.{variant}.safetensors)")

    def own(folder: Path) -> str | None:
        """The variant where this component has it; its default weights where not (as DiffusionPipeline does)."""
        found = weight_variants(folder)
        if variant is None and found and None not in found:
            raise UserInputError(f"{folder} holds only variant weights ({', '.join(sorted(found))}): set "
                                 f"teacher.variant to one of them")
        return variant if variant in found else None

    parts = {"unet": load_model(path / denoiser, dtype, allow_pickle, own(path / denoiser)),
             "scheduler": load_scheduler(path / "scheduler")}
    if (path / "vae").is_dir():
        parts["vae"] = load_model(path / "vae", dtype, allow_pickle, own(path / "vae"))
    for encoder, tokenizer in TEXT_PARTS:
        if (path / encoder).is_dir():
            parts[encoder] = load_text_encoder(path / encoder, dtype, allow_pickle, own(path / encoder))
            parts[tokenizer] = load_tokenizer(path / tokenizer)
    check_added_conditions(parts, path)
    if (path / "model_index.json").is_file():
        index = read_json(path / "model_index.json")
        parts["force_zeros_for_empty_prompt"] = bool(index.get("force_zeros_for_empty_prompt", False))
    return parts



def load_single_file(path: Path, config: str | os.PathLike | None, dtype: torch.dtype = torch.float32,
                     allow_pickle: bool = False) -> dict:
    """unet, scheduler, vae, text encoders and tokenizers of a single-file checkpoint in the original SD / SDXL layout
    (`model.safetensors` as model sites share them), read by diffusers' `from_single_file` with the configs,
    tokenizers and scheduler of `config`: a diffusers folder of the same model type (its weights are not needed:
    `hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include "*.json" "*.txt"`), or a Hub id in the local
    cache. Offline: nothing is downloaded (diffusers would fetch the configs from the Hub without `config`)."""
    if not path.is_file():
        raise UserInputError(f"teacher file not found: {path}")
    if config is None:
        raise UserInputError(f"{path} is a single-file checkpoint: set teacher.config to a diffusers folder (or a "
                             "cached Hub id) of its model type, for its configs and tokenizers; nothing is downloaded")
    if path.suffix != ".safetensors" and not allow_pickle:
        raise UserInputError(f"{path} is not a .safetensors file; pickle checkpoints can run code on load: convert it "
                             "or pass --allow-pickle if you trust the file")
    import diffusers

    config_dir = resolve_model(config)
    if not (config_dir / "model_index.json").is_file():
        raise UserInputError(f"teacher.config {config} is not a diffusers folder (no model_index.json)")
    pipeline_cls = getattr(diffusers, str(read_json(config_dir / "model_index.json").get("_class_name")), None)
    if pipeline_cls is None or not hasattr(pipeline_cls, "from_single_file"):
        raise UserInputError(f"teacher.config {config}: diffusers reads no single files for its pipeline class")
    try:
        pipe = pipeline_cls.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                             **dtype_kwargs(dtype))
    except Exception as err:  # a corrupt file, another model type than the config's, a missing config file
        raise UserInputError(f"cannot load {path} with the configs of {config_dir}: "
                             f"{(str(err).strip().splitlines() or [type(err).__name__])[0]}") from None
    names = ("unet", "scheduler", "vae", *(name for pair in TEXT_PARTS for name in pair))
    parts = {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}
    if "unet" not in parts:
        raise UserInputError(f"teacher.config {config}: onestep distills UNet teachers; "
                             f"{pipeline_cls.__name__} has none")
    check_added_conditions(parts, path)
    parts["force_zeros_for_empty_prompt"] = bool(pipe.config.get("force_zeros_for_empty_prompt", False))
    return parts
