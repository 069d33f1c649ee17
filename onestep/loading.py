"""Reading diffusers folders safely: safetensors only unless pickle is explicitly allowed, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from onestep.errors import UserInputError


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
BUILTIN = {"builtin:digits": Path(__file__).parent / "assets" / "digits_teacher"}


# the weight dtypes a config may name (teacher.dtype, DisBack's path_dtype)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """The from_pretrained keyword for a load dtype: diffusers 0.40 renamed `torch_dtype=` to `dtype=`."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.40") else "torch_dtype": dtype}


def resolve_path(path: str | Path) -> Path:
    """`builtin:digits` names the shipped digits teacher; anything else is a filesystem path."""
    return BUILTIN.get(str(path), Path(path))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserInputError(f"missing {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserInputError(f"corrupt JSON in {path}: {err}") from None


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


def load_model(folder: Path, dtype: torch.dtype = torch.float32, allow_pickle: bool = False):
    """A diffusers model (class named in its config.json) from a local folder."""
    import diffusers

    if not folder.is_dir():
        raise UserInputError(f"model folder not found: {folder}")
    class_name = _read_json(folder / "config.json").get("_class_name")
    model_cls = getattr(diffusers, str(class_name), None)
    if model_cls is None:
        raise UserInputError(f"{folder}/config.json names an unknown diffusers model class {class_name!r}")
    check_weights(folder, allow_pickle)
    try:
        model = model_cls.from_pretrained(folder, use_safetensors=not allow_pickle, **dtype_kwargs(dtype))
    except Exception as err:  # diffusers raises many types for truncated/corrupt files
        raise UserInputError(f"cannot load {folder}: {str(err).splitlines()[0]}") from None
    return model


def load_scheduler(folder: Path):
    import diffusers

    config = _read_json(folder / "scheduler_config.json")
    scheduler_cls = getattr(diffusers, str(config.get("_class_name")), None)
    if scheduler_cls is None or not hasattr(scheduler_cls, "from_config"):
        raise UserInputError(f"{folder} names an unknown scheduler class {config.get('_class_name')!r}")
    return scheduler_cls.from_config(config)


def load_diffusers_folder(path: Path, dtype: torch.dtype = torch.float32, allow_pickle: bool = False) -> dict:
    """unet + scheduler (+ vae, text_encoder, tokenizer when present) of a standard diffusers folder."""
    if not path.is_dir():
        raise UserInputError(f"teacher folder not found: {path}")
    for needed in ("unet", "scheduler"):
        if not (path / needed).is_dir():
            raise UserInputError(f"{path} is not a diffusers model folder: no {needed}/ subfolder")
    parts = {"unet": load_model(path / "unet", dtype, allow_pickle), "scheduler": load_scheduler(path / "scheduler")}
    if (path / "vae").is_dir():
        parts["vae"] = load_model(path / "vae", dtype, allow_pickle)
    if (path / "text_encoder").is_dir():
        import transformers

        check_weights(path / "text_encoder", allow_pickle)
        config = _read_json(path / "text_encoder" / "config.json")
        encoder_cls = getattr(transformers, (config.get("architectures") or ["CLIPTextModel"])[0])
        parts["text_encoder"] = encoder_cls.from_pretrained(path / "text_encoder", use_safetensors=not allow_pickle)
        parts["tokenizer"] = transformers.AutoTokenizer.from_pretrained(path / "tokenizer")
    return parts

