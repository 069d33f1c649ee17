"""SD-family and flow one-step students as stock diffusers pipelines: no custom code, no `trust_remote_code`.

An exported text-to-image `OneStepPipeline` folder (one read-out timestep t0, x0 read-out, a VAE and CLIP text
encoder(s)) is also written as a `StableDiffusionPipeline` / `StableDiffusionXLPipeline` folder whose scheduler's one
step is the student, so that

    StableDiffusionPipeline.from_pretrained(folder)(prompt, num_inference_steps=1, guidance_scale=0.0)

gives the OneStepPipeline's images for the same noise (`latents=z` in both, or the same seeded generator).

Which scheduler. The student is x0 = G(sigma_t0 z, t0) read out by the teacher's `prediction_type` (VP: alpha, sigma
from `alphas_cumprod`). A stock pipeline starts from `latents = z * scheduler.init_noise_sigma` and feeds the UNet
`scheduler.scale_model_input(latents, t)`:
- `EulerDiscreteScheduler`, trailing spacing: `init_noise_sigma` is the VE sigma s = sigma_t0 / alpha_t0 and the UNet
  input latents / sqrt(s^2 + 1) = sigma_t0 z; one Euler step to sigma 0 lands on its `pred_original_sample`, the
  same x0 read-out. One trailing step is t = T-1; another t0 is placed by Karras sigmas with `sigma_max` = s(t0) (a
  one-step Karras schedule is `sigma_max` itself; `timesteps=` cannot then be passed at call time).
- zero terminal SNR at t0 = T-1 (s is infinite there; Euler clamps alpha_bar to 2^-24, an x0 error of ~2^-12 z):
  `LCMScheduler`, whose UNet input is z itself (= sigma_{T-1} z, sigma_{T-1} = 1) and whose boundary scalings at
  t = T-1, c_skip = 0.25 / (10 t)^2 ~ 2.5e-9 and c_out = 1 - O(1e-9), reduce its last step to the x0 read-out.
LCM and DDIM feed z unscaled, so they are the student only where sigma_t0 = 1; Euler is used everywhere else.
- a generator fed z itself at t0 (`input_scaling` "unit", DMD2's SDXL one-step student at t0 = 399): Euler with Karras
  sigmas (`sigma_max` = s(t0)) and `leading` spacing, whose `init_noise_sigma` is sqrt(s^2 + 1): the UNet input
  latents / sqrt(s^2 + 1) is z itself, and the Euler step lands on the same x0 read-out (DMD2's README loads its
  student with LCMScheduler and `timesteps=[399]`, which also feeds z; the Euler folder needs no call-time argument).

Flow students (SD3 / FLUX transformers, read out at t = 1 from pure noise): `StableDiffusion3Pipeline` /
`FluxPipeline` with the teacher's own `FlowMatchEulerDiscreteScheduler`, whose one step (num_inference_steps=1) runs
the transformer at sigma 1 (timestep 1000) on the noise z and steps to sigma 0: x0 = z - v, the student's read-out.
SD3 is called without CFG (`guidance_scale` <= 1); FLUX.1-dev at the embedded guidance the student was trained at
(`guidance_scale`, the folder's `embedded_guidance`); T5's `max_sequence_length` as OneStepPipeline encodes (the
pipeline's default, at most the T5 tokenizer's `model_max_length`).

The stock folder shares the exported weights (hard links where the file system allows, else copies), whose VAE,
text encoders and tokenizers are the teacher folder's own files whatever `teacher.dtype` (onestep.export.frozen):
only `model_index.json` and `scheduler/` are its own, and float32 copies of components whose files on disk are
float16 / bfloat16 (a teacher saved in half precision): a stock pipeline runs every component in the text encoder's
dtype, so a bfloat16 text encoder beside the float32 generator would fail at its first call. The folder is float32
throughout; `from_pretrained(..., torch_dtype=torch.bfloat16)` loads it in half precision.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, LCMScheduler, SchedulerMixin

from onestep.files import atomic_folder, link_or_copy
from onestep.pipelines.pipeline_onestep import FLOW_PIPELINES, flow_image_seq_len, flow_latent_shape


STOCK_SUFFIX = "_diffusers"
LORA_ADAPTER = "pytorch_lora_weights.safetensors"
# model_index.json's mark of a stock folder written here (diffusers ignores keys starting with "_"): its one scheduler
# step is the student, so `onestep sample` / `fid` run it with num_inference_steps=1, not as a 50-step teacher
ONE_STEP_MARK = "_onestep_one_step_student"


def stock_folder(pipeline_dir: str | os.PathLike) -> Path:
    """Where the stock copy of an exported folder goes: `OUTPUT_DIR/pipeline` -> `OUTPUT_DIR/pipeline_diffusers`."""
    pipeline_dir = Path(pipeline_dir)
    return pipeline_dir.with_name(pipeline_dir.name + STOCK_SUFFIX)


def is_one_step_stock(folder: str | os.PathLike) -> bool:
    """Whether a diffusers folder is a stock export of a one-step student: marked in its model_index.json, or
    (written before the mark) `NAME_diffusers/` beside the one-step OneStepPipeline folder `NAME/` it copies."""
    folder = Path(folder)
    try:
        index = json.loads((folder / "model_index.json").read_text())
        if index.get(ONE_STEP_MARK):
            return True
        if not folder.name.endswith(STOCK_SUFFIX):
            return False
        source = folder.with_name(folder.name.removesuffix(STOCK_SUFFIX))
        source = json.loads((source / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return source.get("_class_name") == "OneStepPipeline" and len(source.get("timesteps", [])) == 1


def stock_scheduler(teacher_config: dict, t0: int, input_scaling: str = "sigma") -> SchedulerMixin | None:
    """A stock scheduler whose one step (num_inference_steps=1) reads x0 out at t0 from sigma_t0 z (or from z itself,
    `input_scaling` "unit"), as the student does; None when the teacher's noise schedule cannot be carried over
    exactly."""
    teacher = DDPMScheduler.from_config(teacher_config)
    abar = teacher.alphas_cumprod.double()
    last = len(abar) - 1
    if t0 == last and abar[last] == 0:  # sigma_t0 = 1: both input scalings feed z
        scheduler = LCMScheduler.from_config(teacher_config, clip_sample=False, thresholding=False,
                                             original_inference_steps=len(abar))
    else:
        # every option that would move the sigmas off the teacher's schedule set explicitly (a teacher's own Euler
        # config may carry others)
        karras = t0 != last or input_scaling == "unit"
        euler = {"timestep_spacing": "leading" if input_scaling == "unit" else "trailing", "steps_offset": 1,
                 "interpolation_type": "linear", "timestep_type": "discrete", "final_sigmas_type": "zero",
                 "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_karras_sigmas": karras}
        if karras:
            euler.update(sigma_max=float(((1 - abar[t0]) / abar[t0]).sqrt()),
                         sigma_min=float(((1 - abar[0]) / abar[0]).sqrt()))
        scheduler = EulerDiscreteScheduler.from_config(teacher_config, **euler)
    same_schedule = torch.allclose(scheduler.alphas_cumprod.double()[:last], abar[:last], rtol=1e-6, atol=0)
    scheduler.set_timesteps(1)
    one_step = np.isclose(float(scheduler.timesteps[0]), t0, rtol=0, atol=1e-3)
    return scheduler if same_schedule and one_step else None


def _half_precision(component_dir: Path) -> bool:
    """Whether a component folder's safetensors hold float16 / bfloat16 weights (read from the file headers)."""
    from safetensors import safe_open

    for file in component_dir.glob("*.safetensors"):
        with safe_open(file, "pt") as weights:
            if any(weights.get_slice(key).get_dtype() in ("F16", "BF16") for key in weights.keys()):
                return True
    return False


def _save_float32(src: Path, dst: Path, library: str, class_name: str) -> None:
    """A float32 copy of a diffusers / transformers component folder."""
    model = getattr(importlib.import_module(library), class_name).from_pretrained(src)
    if model.dtype != torch.float32:  # diffusers models load in float32 already; transformers keep the saved dtype
        model.to(torch.float32)
    model.save_pretrained(dst)


def export_stock_pipeline(pipeline_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path | None:
    """Write the stock `StableDiffusion(XL)Pipeline` folder of an exported OneStepPipeline folder (default
    `stock_folder(pipeline_dir)`); returns it, or None where the folder is not a one-step SD-family student (a
    class-conditional or pixel generator, several read-out timesteps, a BOOT signal read-out) or its schedule has no
    stock equivalent.

    A folder that keeps its LoRA beside the base UNet (`lora.export: adapter`) gives a stock folder of the base UNet
    with the LoRA in diffusers' format (`pytorch_lora_weights.safetensors`, the file `load_lora_weights(folder)`
    picks) and in kohya's (`lora_kohya.safetensors`, for ComfyUI / A1111): the student is

        pipe = StableDiffusionPipeline.from_pretrained(folder); pipe.load_lora_weights(folder)

    and the same LoRA applied to the stock teacher, with this folder's one-step scheduler, gives it too."""
    pipeline_dir = Path(pipeline_dir)
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    if (index.get("unet") or [None, None])[1] in FLOW_PIPELINES:
        return export_stock_flow_pipeline(pipeline_dir, index, out_dir)
    text_to_image = all((index.get(name) or [None])[0] for name in ("vae", "text_encoder", "tokenizer"))
    if (index.get("_class_name") != "OneStepPipeline" or not text_to_image or index.get("readout", "x0") != "x0"
            or len(index.get("timesteps", [])) != 1 or index.get("num_classes") is not None):
        return None
    teacher_config = DDPMScheduler.load_config(pipeline_dir / "scheduler")
    scheduler = stock_scheduler(teacher_config, index["timesteps"][0], index.get("input_scaling", "sigma"))
    if scheduler is None:
        return None
    sdxl = bool((index.get("text_encoder_2") or [None])[0])
    components = ["unet", "vae", "text_encoder", "tokenizer", *(["text_encoder_2", "tokenizer_2"] if sdxl else [])]
    stock_index = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
                   "_diffusers_version": diffusers.__version__,
                   **{name: index[name] for name in components},
                   "scheduler": ["diffusers", type(scheduler).__name__], ONE_STEP_MARK: True,
                   "feature_extractor": [None, None], "image_encoder": [None, None]}
    if sdxl:  # an invisible watermark, where its package is installed, would change the student's images
        stock_index["add_watermarker"] = False
    else:
        stock_index.update(safety_checker=[None, None], requires_safety_checker=False)
    out_dir = Path(out_dir) if out_dir is not None else stock_folder(pipeline_dir)
    with atomic_folder(out_dir) as tmp:
        _copy_components(pipeline_dir, tmp, index, {name: name for name in components})
        scheduler.save_pretrained(tmp / "scheduler")
        if (pipeline_dir / LORA_ADAPTER).is_file():
            from onestep.models.lora import KOHYA_WEIGHTS, save_kohya_lora

            link_or_copy(pipeline_dir / LORA_ADAPTER, tmp / LORA_ADAPTER)
            save_kohya_lora(pipeline_dir, tmp / KOHYA_WEIGHTS)
        (tmp / "model_index.json").write_text(json.dumps(stock_index, indent=2) + "\n")
    return out_dir


def _copy_components(pipeline_dir: Path, tmp: Path, index: dict, names: dict[str, str]) -> None:
    """Each component folder `names[stock name] = exported name` into the stock folder: linked, or as a float32 copy
    where the exported one is half precision."""
    for stock_name, name in names.items():
        if name.startswith("tokenizer") or not _half_precision(pipeline_dir / name):
            shutil.copytree(pipeline_dir / name, tmp / stock_name, copy_function=link_or_copy)
        else:  # a half-precision teacher's VAE / text encoder beside the float32 generator (see above)
            _save_float32(pipeline_dir / name, tmp / stock_name, *index[name])


def flow_one_step_scheduler(config: dict, image_seq_len: int):
    """The teacher's FlowMatchEulerDiscreteScheduler if its one step starts at sigma 1 as the pipelines set it
    (SD3: num_inference_steps=1; FLUX: sigmas [1.0] at `mu` of `image_seq_len` tokens), else None."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    if scheduler.config.use_dynamic_shifting:
        mu = calculate_shift(image_seq_len, scheduler.config.base_image_seq_len, scheduler.config.max_image_seq_len,
                             scheduler.config.base_shift, scheduler.config.max_shift)
        scheduler.set_timesteps(sigmas=[1.0], mu=mu)
    else:
        scheduler.set_timesteps(1)
    return scheduler if scheduler.sigmas.tolist() == [1.0, 0.0] else None


def export_stock_flow_pipeline(pipeline_dir: Path, index: dict,
                               out_dir: str | os.PathLike | None = None) -> Path | None:
    """The stock `StableDiffusion3Pipeline` / `FluxPipeline` folder of an exported flow student read out at t = 1
    (the last grid time) in one step; None for a few-step student, a LoRA adapter kept beside the base, or a
    scheduler whose one step does not start at sigma 1."""
    config = json.loads((pipeline_dir / "scheduler" / "scheduler_config.json").read_text())
    last = config.get("num_train_timesteps", 1000) - 1
    adapter = (pipeline_dir / LORA_ADAPTER).exists()
    if index.get("readout", "x0") != "x0" or index.get("timesteps") != [last] or adapter:
        return None
    transformer_cls = getattr(diffusers, index["unet"][1])
    with torch.device("meta"):  # the configs only: the latent shape
        transformer = transformer_cls.from_config(transformer_cls.load_config(pipeline_dir / "unet"))
    vae = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(pipeline_dir / "vae"))
    if flow_one_step_scheduler(config, flow_image_seq_len(flow_latent_shape(transformer, vae))) is None:
        return None
    pipeline_class = FLOW_PIPELINES[index["unet"][1]]
    texts = [f"{kind}{suffix}" for suffix in ("", "_2", "_3") for kind in ("text_encoder", "tokenizer")]
    present = [name for name in ("vae", *texts) if (index.get(name) or [None])[0]]
    if pipeline_class == "FluxPipeline":  # FLUX's second text encoder is T5; a third would be no FLUX folder
        present = [name for name in present if not name.endswith("_3")]
    stock_index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__,
                   "transformer": index["unet"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                   **{name: index[name] for name in present}, "image_encoder": [None, None],
                   "feature_extractor": [None, None]}
    if pipeline_class == "StableDiffusion3Pipeline":
        stock_index.update({name: [None, None] for name in ("text_encoder_3", "tokenizer_3") if name not in present})
    out_dir = Path(out_dir) if out_dir is not None else stock_folder(pipeline_dir)
    with atomic_folder(out_dir) as tmp:
        _copy_components(pipeline_dir, tmp, index, {"transformer": "unet", **{name: name for name in present}})
        shutil.copytree(pipeline_dir / "scheduler", tmp / "scheduler", copy_function=link_or_copy)
        (tmp / "model_index.json").write_text(json.dumps(stock_index, indent=2) + "\n")
    return out_dir
