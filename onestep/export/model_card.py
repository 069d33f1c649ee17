"""The model card (README.md) of an exported folder: base model, method, license, training config, metrics, loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from onestep.files import atomic_file


METHODS = {  # method -> the paper it follows
    "dmd": "One-step Diffusion with Distribution Matching Distillation (DMD; Yin et al. 2023)",
    "dmd2": "Improved Distribution Matching Distillation for Fast Image Synthesis (DMD2; Yin et al. 2024)",
    "sid": "Score identity Distillation (SiD; Zhou et al. 2024)",
    "sida": "Adversarial Score identity Distillation (SiDA; Zhou et al. 2024)",
    "sfd": "Score Forgetting Distillation (SFD; Chen, Zhang, Zhou 2024)",
    "msd": "Multi-Student Diffusion Distillation (MSD; Song et al. 2024)",
    "disback": "Distribution Backtracking (DisBack; Zhang et al. 2024), on DMD2",
    "disback_sid": "Distribution Backtracking (DisBack; Zhang et al. 2024), on SiD",
    "boot": "BOOT: data-free distillation with bootstrapping (Gu et al. 2023)",
    "tsm": "teacher score matching (MSD's stage 0 for a smaller student)",
    "teacher": "denoising score matching (a diffusion teacher trained from data)",
    "vae": "a KL autoencoder (the latent space of a latent diffusion teacher, trained from data)",
}
FROM_DATA = ("teacher", "vae")  # trained from data, not distilled: no teacher, so no base model


def teacher_license(teacher_path: str | None) -> str | None:
    """The `license` of the teacher's own model card (README.md front matter), when it has one."""
    from onestep.models.loading import resolve_path

    if not teacher_path:
        return None
    card = resolve_path(teacher_path) / "README.md"
    if not card.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(teacher_path), "README.md")  # a Hub id in the local cache
        except ValueError:  # not a repo id
            return None
        if not isinstance(cached, str):
            return None
        card = Path(cached)
    try:
        if not card.read_text().startswith("---"):  # no front matter (huggingface_hub would log that it has none)
            return None
        return ModelCard.load(card).data.license
    except (ValueError, OSError, UnicodeDecodeError, yaml.YAMLError):  # broken front matter, unreadable
        return None


def hub_id(teacher_path: str | None) -> str | None:
    """The Hub id a card's `base_model` names: the teacher's where it is one (`owner/name` in the local cache), or
    where its folder is a snapshot in a Hugging Face cache (`.../models--owner--name/snapshots/...`); None for another
    local folder or a builtin teacher (a path is no Hub id, and means nothing once the card travels)."""
    from onestep.models.loading import HUB_ID, resolve_path

    if not teacher_path:
        return None
    local = resolve_path(teacher_path)
    if not local.exists():
        return str(teacher_path) if HUB_ID.fullmatch(str(teacher_path)) else None
    cached = [part for part in local.resolve().parts if part.startswith("models--")]
    return cached[-1].removeprefix("models--").replace("--", "/", 1) if cached else None


def teacher_label(teacher_path: str | None) -> str:
    """How the card's text names the teacher: its Hub id, a builtin name, or the folder's absolute path (a run
    config without one: a teacher built in memory)."""
    from onestep.models.loading import BUILTIN

    if not teacher_path:
        return "a teacher built in memory"
    if str(teacher_path) in BUILTIN:
        return str(teacher_path)
    return hub_id(teacher_path) or str(Path(teacher_path).resolve())


def _metrics_section(metrics: dict | None) -> str:
    if not metrics:
        return "No metrics were recorded for this export (export without a finished training run).\n"
    lines = [f"Measured by onestep at the end of training (step {metrics.get('step')}, "
             f"{metrics.get('train_seconds')} s of training), on the EMA weights where EMA is on:", "",
             "| metric | value |", "|---|---|"]
    final = metrics.get("final") if isinstance(metrics.get("final"), dict) else {}
    lines += [f"| {key} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |"
              for key, value in final.items() if key not in ("step", "elapsed_s")]
    if not final:
        lines.append("| (none: this run had no judge) | |")
    return "\n".join(lines) + "\n"


def _loading_section(folder: Path, stock: Path | None, text: bool) -> str:
    index = json.loads((folder / "model_index.json").read_text())
    pipeline_class, custom = index["_class_name"], next((p.stem for p in folder.glob("pipeline_*.py")), None)
    call = 'prompt=["a photo of a cat"]' if text else "batch_size=4"
    parts = [f"```python\nimport torch\nfrom onestep.pipelines import {pipeline_class}\n\n"
             f'pipe = {pipeline_class}.from_pretrained("{folder.name}")\n'
             f"images = pipe({call}, generator=torch.Generator().manual_seed(0)).images\n```\n"]
    if custom:
        parts.append(f"Without onestep installed (the pipeline file travels in the folder):\n\n```python\n"
                     f"from diffusers import DiffusionPipeline\n\n"
                     f'pipe = DiffusionPipeline.from_pretrained("{folder.name}", custom_pipeline="{custom}", '
                     f"trust_remote_code=True)\n```\n")
    if stock is not None:
        from onestep.export.single_file import single_file
        from onestep.models.lora import KOHYA_WEIGHTS, LORA_WEIGHTS

        stock_index = json.loads((stock / "model_index.json").read_text())
        lora = (stock / LORA_WEIGHTS).is_file()  # lora.export=adapter: the base UNet, and the student as a LoRA
        single = single_file(folder)
        parts.append(f"With stock diffusers and no custom code (`{stock.name}/`: "
                     + ("the base UNet and the student's LoRA" if lora else "the same weights")
                     + f", with the scheduler `{stock_index['scheduler'][1]}` set so that its one step is the "
                     "student's read-out):\n\n```python\n"
                     f"from diffusers import {stock_index['_class_name']}\n\n"
                     f'pipe = {stock_index["_class_name"]}.from_pretrained("{stock.name}")\n'
                     + (f'pipe.load_lora_weights("{stock.name}")  # without it: the teacher\'s one step\n'
                        if lora else "")
                     + 'image = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=0.0).images[0]\n```\n'
                     "The student runs without classifier-free guidance (`guidance_scale` <= 1): the teacher's "
                     "guidance, if any, was distilled in.\n")
        if lora:
            parts.append(f"The LoRA applies to the stock teacher too (`load_lora_weights`); `{stock.name}/"
                         f"{KOHYA_WEIGHTS}` is the same LoRA in kohya's layout (ComfyUI, A1111).\n")
        if single.is_file():
            parts.append(f"`{single.name}` is the student as one file in the original SD / SDXL layout (ComfyUI, "
                         f"A1111: one step, CFG 1):\n\n```python\n"
                         f"from diffusers import {stock_index['_class_name']}\n\n"
                         f'pipe = {stock_index["_class_name"]}.from_single_file("{single.name}", '
                         f'config="{stock.name}", local_files_only=True)\n'
                         'image = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=0.0).images[0]\n'
                         "```\n")
    return "\n".join(parts)


def _input_note(index: dict) -> str:
    """How an x0 read-out generator takes its noise (OneStepPipeline's `input_scaling`)."""
    if index.get("readout", "x0") != "x0":
        return ""
    if index.get("input_scaling", "sigma") == "unit":
        return " from unit-variance noise z itself (as DMD2's SDXL one-step student), not sigma_t0 z"
    return " from sigma_t0 z (z unit-variance noise, sigma_t0 the noise level of the first read-out timestep)"


def model_card(folder: Path, run_config: dict, metrics: dict | None = None, stock: Path | None = None) -> ModelCard:
    """The card of an exported folder from the run's config (`config.json`) and metrics (`metrics.json`)."""
    index = json.loads((folder / "model_index.json").read_text())
    text = bool((index.get("text_encoder") or [None])[0])
    method = run_config.get("method", "unknown")
    # a run config always holds teacher.path (its default), also when the run trained from data alone
    teacher = None if method in FROM_DATA else (run_config.get("teacher") or {}).get("path")
    data = ModelCardData(base_model=hub_id(teacher), license=teacher_license(teacher), library_name="diffusers",
                         pipeline_tag="text-to-image" if text else "unconditional-image-generation",
                         tags=["onestep", method, "diffusion-distillation", "one-step"])
    readout = index.get("timesteps")
    data_name = (run_config.get("data") or {}).get("name")
    summary = ([f"# {method} model trained on `{data_name}`", "", f"Trained with onestep: {METHODS[method]}."]
               if teacher is None and method in FROM_DATA else
               [f"# {method} student of `{teacher_label(teacher)}`", "",
                f"A generator distilled with onestep by {METHODS.get(method, method)}"
                + (f"; the generator reads out at timesteps {readout}{_input_note(index)}." if readout else ".")])
    body = "\n".join([
        *summary, "",
        "## Metrics", "", _metrics_section(metrics),
        "## How to load", "", _loading_section(folder, stock, text),
        "## Training config", "", "```yaml", yaml.safe_dump(run_config, sort_keys=False).rstrip(), "```", ""])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_model_card(folder: str | os.PathLike, run_config: dict, metrics: dict | None = None) -> None:
    """README.md in an exported folder and, where there is one, in its stock diffusers copy (onestep.export.stock).
    A folder that is not a pipeline (a `method: vae` run exports a bare AutoencoderKL) gets none."""
    from onestep.export.stock import stock_folder

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        return
    stock = stock_folder(folder)
    stock = stock if (stock / "model_index.json").is_file() else None
    text = str(model_card(folder, run_config, metrics, stock))
    for target in (folder, stock):
        if target is not None:
            with atomic_file(target / "README.md") as f:
                f.write(text.encode())
