"""Try it small first: tiny random diffusers folders of each published layout, and the overrides that run any recipe
(configs/{sd15,sdxl,sd3,flux}/*.yaml) on one in seconds on a CPU.

    onestep tiny sd15 /tmp/tiny_sd15
    onestep train configs/sd15/dmd2.yaml --tiny /tmp/tiny_sd15

The weights are random (the UNet kinds are built from `onestep/assets/shapes/tiny*/`, the flow-transformer kinds by
`onestep.models.tiny_folders`): a tiny folder checks that a recipe, its data path, its export and the stock loaders
work end to end, never what a recipe learns. The folder is a standard diffusers folder
(`DiffusionPipeline.from_pretrained(OUT)` loads it) and also holds `prompts.txt` and `images/` (a captioned
imagefolder of random pixels) for the recipes' data, and `runs/` for their outputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from onestep.errors import UserInputError


# `onestep tiny KIND` for the UNet kinds -> the shape (onestep/assets/shapes/<shape>/) they are built from
SHAPES = {"sd15": "tiny", "sdxl": "tiny_sdxl"}
KINDS = (*SHAPES, "sd3", "flux")  # the flow-transformer kinds: onestep.models.tiny_folders (FLUX as FLUX.1-dev)
PROMPTS = [f"a photo of a {colour} {thing}" for colour in ("red", "blue", "green", "black")
           for thing in ("cat", "car", "house", "tree")]  # enough distinct prompts for MSD's text partition
NUM_IMAGES = 4


def write_tiny(kind: str, out: str | os.PathLike) -> dict:
    """Write the tiny folder of `kind` (sd15 | sdxl | sd3 | flux) to `out` (which must not hold anything yet);
    returns what was written, for the command's JSON line."""
    from onestep.files import atomic_folder
    from onestep.models.shapes import write_random_images, write_random_teacher
    from onestep.models.tiny_folders import tiny_flux_folder, tiny_sd3_folder

    if kind not in KINDS:
        raise UserInputError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"{out} already exists and is not empty; choose a new folder")
    with atomic_folder(out) as tmp:
        if kind in SHAPES:
            write_random_teacher(SHAPES[kind], tmp)
        else:
            (tiny_sd3_folder if kind == "sd3" else tiny_flux_folder)(tmp)
        (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        write_random_images(tmp / "images", image_side(tmp), NUM_IMAGES)
        pipeline = json.loads((tmp / "model_index.json").read_text())["_class_name"]
    return {"folder": str(out), "kind": kind, "pipeline": pipeline,
            "try": f"onestep train configs/{kind}/dmd2.yaml --tiny {out}"}


def image_side(folder: Path) -> int:
    """The pixel side of a tiny folder's images: the resolution its teacher trains at (for FLUX, whose transformer
    has no sample size, the VAE's), as the training code itself reads it."""
    from onestep.models.teacher import Teacher

    return Teacher.from_pretrained(folder).image_size[0]


# per method: what shortens its own schedule (DisBack records a degradation path first; MSD trains each student)
METHOD_OVERRIDES = {"disback": ["options.num_checkpoints=2", "options.steps_per_checkpoint=1"],
                    "msd": ["options.num_students=2", "data.name=prompts"],  # its students partition the prompts
                    "boot": ["options.num_grid_steps=4"]}


def tiny_overrides(folder: str | os.PathLike, recipe: str | os.PathLike) -> list[str]:
    """The `key=value` overrides that run `recipe` on the tiny folder: its teacher, prompts and images; batch 2, 2
    steps, no loader workers; the evaluation off (no FID network, reference or CLIP model: the end-of-run judge draws
    only the sample grid); the run's files in FOLDER/runs/<recipe folder>_<recipe name>. Later overrides win."""
    from omegaconf import OmegaConf

    folder, recipe = Path(folder), Path(recipe)
    if not (folder / "model_index.json").is_file() or not (folder / "prompts.txt").is_file():
        raise UserInputError(f"--tiny {folder} is not a folder written by `onestep tiny`")
    try:
        method = OmegaConf.load(recipe).get("method") if recipe.is_file() else None
    except Exception:  # an unreadable recipe: load_config names the problem
        method = None
    return [f"teacher.path={folder}", "teacher.variant=null", "teacher.revision=null",
            f"data.image_dir={folder / 'images'}", f"data.prompts={folder / 'prompts.txt'}", "data.batch_size=2",
            "data.num_workers=0", "data.latent_cache=null",
            "train.max_steps=2", "train.max_minutes=null", "train.gradient_accumulation_steps=1", "train.log_every=1",
            "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=2",
            "eval.features=none", "eval.metrics=[]", "eval.num_samples=2", "eval.sampling_batch=2",
            "eval.prompts=null", "eval.validation_prompts=null", "eval.clip_model=null", "eval.inception_weights=null",
            f"output_dir={folder / 'runs' / f'{recipe.parent.name}_{recipe.stem}'}",
            *METHOD_OVERRIDES.get(str(method), [])]
