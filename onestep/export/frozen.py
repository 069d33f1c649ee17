"""The teacher's frozen components (VAE, text encoders, tokenizers) in an export exactly as they are on disk.

Distillation never changes them, but the teacher holds them in `teacher.dtype`: saved from memory, a bfloat16 teacher
would export a bfloat16 VAE and text encoder (and a float32 copy of those differs from the original by ~1e-3). An
export instead carries the teacher folder's own files, hard-linked where the file system allows, else copied, so
they are byte-identical to the teacher's. Where the files cannot be carried over (pickle weights, sharded variant
weights) the component is read from the teacher folder in float32 (exact for float16 / bfloat16 / float32 files)
and saved as safetensors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from onestep.files import link_or_copy
from onestep.models.loading import PICKLE_SUFFIXES, load_model, load_text_encoder, weight_variants
from onestep.models.teacher import Teacher


FROZEN = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def _variant(file: Path) -> str | None:
    """The weights variant a safetensors file or shard index belongs to ("fp16" for model.fp16.safetensors or
    model.safetensors.index.fp16.json; None for the default weights)."""
    name = file.name
    if ".safetensors.index." in name:
        middle = name.split(".safetensors.index.", 1)[1].removesuffix(".json")
        return middle or None
    parts = name.removesuffix(".safetensors").split(".")
    return parts[1].split("-")[0] if len(parts) > 1 else None


def original_files(component: Path, variant: str | None) -> dict[str, Path] | None:
    """{name in the export: teacher file} of one component folder: its configs and tokenizer files, and the
    safetensors weights a load with `variant` reads (unsharded variant weights under the default name, which a load
    without a variant reads); None where its weights cannot be carried as files (pickle only, sharded variant)."""
    files = {file.name: file for file in component.iterdir() if file.is_file() and file.suffix not in PICKLE_SUFFIXES}
    weights = {name: file for name, file in files.items() if ".safetensors" in name}
    found = {_variant(file) for file in weights.values()}
    chosen = variant if variant in found else None  # as loading does: the variant where the component has it
    kept = {name: file for name, file in files.items() if name not in weights}
    for name, file in weights.items():
        if _variant(file) != chosen:
            continue
        if chosen is not None and (".index." in name or "-of-" in name):
            return None  # a variant's shard index names its shards: renaming them would break it
        kept[name.replace(f".{chosen}", "", 1) if chosen else name] = file
    needs_weights = (component / "config.json").is_file()  # a model, not a tokenizer
    if needs_weights and not any(".safetensors" in name for name in kept):
        return None
    return kept


def use_original_components(teacher: Teacher, folder: Path) -> None:
    """Replace the frozen components a pipeline saved into `folder` from memory by the teacher folder's own files
    (see the module docstring); a teacher built in memory (no `source`) keeps what was saved."""
    if teacher.source is None:
        return
    source = Path(teacher.source)
    for name in FROZEN:
        original, saved = source / name, folder / name
        if getattr(teacher, name, None) is None or not saved.is_dir() or not original.is_dir():
            continue
        files = original_files(original, teacher.source_variant)
        if files is None:
            _save_float32(original, saved, name, teacher.source_variant)
            continue
        shutil.rmtree(saved)
        saved.mkdir()
        for target, file in files.items():
            link_or_copy(file, saved / target)


def _save_float32(original: Path, saved: Path, name: str, variant: str | None) -> None:
    """The component read from the teacher's files in float32 and saved as safetensors (in place of the copy saved
    from the teacher's memory, which is in `teacher.dtype`)."""
    load = load_model if name == "vae" else load_text_encoder
    own = variant if variant in weight_variants(original) else None
    model = load(original, torch.float32, allow_pickle=True, variant=own)
    shutil.rmtree(saved)
    model.save_pretrained(saved, safe_serialization=True)
