"""A one-step SD-family student as one `.safetensors` file in the original Stable Diffusion / SDXL key layout: the
checkpoint format of model sites, ComfyUI and A1111 (tianweiy/DMD2 issue #20), beside the stock diffusers folder.

    runs/x/pipeline/                  OneStepPipeline folder
    runs/x/pipeline_diffusers/        the same student as a stock StableDiffusion(XL)Pipeline folder
    runs/x/pipeline.safetensors       its UNet, VAE and text encoder(s) in one file, original key layout

The file holds `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and the text encoders: SD1.x's CLIP under
`cond_stage_model.transformer.*`; SDXL's CLIP ViT-L under `conditioner.embedders.0.transformer.*` and its OpenCLIP
bigG under `conditioner.embedders.1.model.*` (OpenCLIP's fused q/k/v projection and transposed text projection).
diffusers ships the conversion from this layout (`diffusers.loaders.single_file_utils`), not to it; the mapping here
inverts it, and every file is checked against it before it is written: diffusers' own converters must give back every
weight of the stock folder exactly. Loading it back (offline: the stock folder gives the configs, the tokenizers and
the one-step scheduler):

    StableDiffusionPipeline.from_single_file("runs/x/pipeline.safetensors", config="runs/x/pipeline_diffusers",
                                             local_files_only=True)
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import torch
from diffusers.loaders import single_file_utils as sf


UNET = sf.LDM_UNET_KEY  # "model.diffusion_model."
VAE = sf.LDM_VAE_KEYS[0]  # "first_stage_model."
CLIP_SD1 = sf.LDM_CLIP_PREFIX_TO_REMOVE[0]  # "cond_stage_model.transformer."
CLIP_SDXL = sf.LDM_CLIP_PREFIX_TO_REMOVE[1]  # "conditioner.embedders.0.transformer."
OPEN_CLIP_SDXL = "conditioner.embedders.1.model."
# diffusers' ResNet parameter names -> the original ResBlock's (inverse of update_unet_resnet_ldm_to_diffusers)
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
# diffusers' VAE attention parameter names -> the original AttnBlock's (inverse of update_vae_attentions_ldm_...)
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def single_file(pipeline_dir: str | os.PathLike) -> Path:
    """Where the single file of an exported folder goes: `OUTPUT_DIR/pipeline` -> `OUTPUT_DIR/pipeline.safetensors`."""
    pipeline_dir = Path(pipeline_dir)
    return pipeline_dir.with_name(pipeline_dir.name + ".safetensors")


def unet_key(key: str, config: dict) -> str:
    """The original (LDM) name of a diffusers UNet2DConditionModel parameter (inverts convert_ldm_unet_checkpoint)."""
    tables = sf.DIFFUSERS_TO_LDM_MAPPING["unet"]
    for table in (tables["layers"], tables["addition_embed_type"], tables["class_embed_type"]):
        if key in table:
            return table[key]
    if key == "class_embedding.weight":
        return "label_emb.weight"
    per_level = config["layers_per_block"] + 1  # the original counts each level's layers and its down/upsampler
    part = key.split(".")
    if part[0] == "down_blocks" and part[2] == "downsamplers":  # down_blocks.L.downsamplers.0.conv.P
        return f"input_blocks.{(int(part[1]) + 1) * per_level}.0.op.{part[-1]}"
    if part[0] == "up_blocks" and part[2] == "upsamplers":  # after the level's last ResBlock (and its attention)
        level = int(part[1])
        slot = 2 if "CrossAttn" in config["up_block_types"][level] else 1
        return f"output_blocks.{level * per_level + per_level - 1}.{slot}.conv.{part[-1]}"
    if part[0] == "down_blocks":  # input_blocks.N.0 is the level's ResBlock, input_blocks.N.1 its attention
        level, kind, layer, rest = int(part[1]), part[2], int(part[3]), part[4:]
        block = f"input_blocks.{level * per_level + layer + 1}.{0 if kind == 'resnets' else 1}"
    elif part[0] == "up_blocks":
        level, kind, layer, rest = int(part[1]), part[2], int(part[3]), part[4:]
        block = f"output_blocks.{level * per_level + layer}.{0 if kind == 'resnets' else 1}"
    elif part[0] == "mid_block":  # middle_block.0, .1, .2: ResBlock, attention, ResBlock
        kind, rest = part[1], part[3:]
        block = f"middle_block.{2 * int(part[2]) if kind == 'resnets' else 1}"
    else:
        raise ValueError(f"no original name for UNet parameter {key}")
    if kind == "resnets":
        return f"{block}.{UNET_RESNET.get(rest[0], rest[0])}.{'.'.join(rest[1:])}"
    return f"{block}.{'.'.join(rest)}"  # attentions: the transformer keeps diffusers' names


def vae_key(key: str, config: dict) -> str:
    """The original (LDM) name of a diffusers AutoencoderKL parameter."""
    if key in sf.DIFFUSERS_TO_LDM_MAPPING["vae"]:
        return sf.DIFFUSERS_TO_LDM_MAPPING["vae"][key]
    coder, _, key = key.partition(".")
    levels = len(config["up_block_types"])
    rules = [(r"down_blocks\.(\d+)\.resnets\.", lambda m: f"down.{m[1]}.block."),
             (r"down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"down.{m[1]}.downsample."),
             (r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m[1])}.block."),
             (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m[1])}.upsample."),
             (r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
             (r"mid_block\.attentions\.0\.", lambda m: "mid.attn_1.")]
    for pattern, original in rules:
        match = re.match(pattern, key)
        if match:
            rest = key[match.end():]
            if "attn" in original(match):
                name, _, param = rest.rpartition(".")
                rest = f"{VAE_ATTENTION[name]}.{param}"
            return f"{coder}.{original(match)}{rest.replace('conv_shortcut', 'nin_shortcut')}"
    raise ValueError(f"no original name for VAE parameter {coder}.{key}")


def clip_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder's weights under `prefix` + `text_model.` (HF names, as SD1.x / SDXL store
    them; transformers >= 5.6 saves CLIPTextModel without its `text_model.` level)."""
    return {prefix + (k if k.startswith("text_model.") or k == "text_projection.weight" else "text_model." + k): v
            for k, v in state.items()}


def open_clip_state(state: dict[str, torch.Tensor], prefix: str = OPEN_CLIP_SDXL) -> dict[str, torch.Tensor]:
    """SDXL's second encoder (CLIPTextModelWithProjection) in OpenCLIP's names: q/k/v fused into `in_proj_*`, the
    text projection transposed (inverse of diffusers' convert_open_clip_checkpoint)."""
    tables = sf.DIFFUSERS_TO_LDM_MAPPING["openclip"]
    renames = [(d, o) for d, o in tables["transformer"].items() if not d.startswith("transformer.")]  # per layer
    out = {}
    for key, value in state.items():
        if key in tables["layers"]:
            out[prefix + tables["layers"][key]] = value.T.contiguous() if key == "text_projection.weight" else value
            continue
        if ".k_proj." in key or ".v_proj." in key or key.endswith("position_ids"):
            continue  # k, v: fused with q below; position ids: a buffer OpenCLIP does not store
        name = key
        for diffusers_name, original in renames:
            name = name.replace(diffusers_name, original)
        if ".q_proj." in key:
            value = torch.cat([state[key.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"])
            name = name.replace(".q_proj.", ".in_proj_")  # attn.in_proj_weight / attn.in_proj_bias
        out[prefix + "transformer." + name] = value
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a component folder's safetensors (its shards together)."""
    from safetensors.torch import load_file

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def _vae_value(original: str, value: torch.Tensor) -> torch.Tensor:
    """The original VAE attention is 1x1 convolutions where diffusers has linear layers."""
    return value[:, :, None, None] if ".mid.attn_1." in original and value.dim() == 2 else value


def original_state(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The UNet, VAE and text encoder(s) of a stock SD / SDXL diffusers folder under their original names, checked
    against diffusers' own conversion back (`ValueError` where it would not give every weight back exactly)."""
    folder = Path(folder)
    config = {name: json.loads((folder / name / "config.json").read_text()) for name in ("unet", "vae")}
    parts = {name: _weights(folder / name) for name in ("unet", "vae", "text_encoder", "text_encoder_2")
             if (folder / name).is_dir()}
    state = {UNET + unet_key(k, config["unet"]): v for k, v in parts["unet"].items()}
    for key, value in parts["vae"].items():
        original = VAE + vae_key(key, config["vae"])
        state[original] = _vae_value(original, value)
    if "text_encoder_2" in parts:
        state.update(clip_state(parts["text_encoder"], CLIP_SDXL))
        state.update(open_clip_state(parts["text_encoder_2"]))
    else:
        state.update(clip_state(parts["text_encoder"], CLIP_SD1))
    _check_round_trip(state, parts, config)
    return state


def _check_round_trip(state: dict, parts: dict, config: dict) -> None:
    """diffusers' single-file converters, run on `state`, must give each component's weights back exactly."""
    back = {"unet": sf.convert_ldm_unet_checkpoint(state, config["unet"]),
            "vae": sf.convert_ldm_vae_checkpoint(state, config["vae"]),
            "text_encoder": sf.convert_ldm_clip_checkpoint(state)}
    if "text_encoder_2" in parts:
        back["text_encoder_2"] = sf.convert_open_clip_checkpoint(None, state, prefix=OPEN_CLIP_SDXL)
    for name, converted in back.items():
        if "text_model.embeddings.token_embedding.weight" not in parts[name]:  # transformers >= 5.6 flattens CLIP
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        expected = parts[name]
        wrong = sorted(set(expected) ^ set(converted)) or [k for k in expected if not torch.equal(expected[k],
                                                                                                   converted[k])]
        if wrong:
            raise ValueError(f"the original layout of {name} does not convert back ({wrong[0]}, "
                             f"{len(wrong)} weights): not written")


def export_single_file(stock_dir: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Write the stock folder's UNet, VAE and text encoder(s) as one original-layout safetensors file, atomically (a
    temporary file beside it, renamed when complete: no second in-memory copy of an SDXL-sized file)."""
    from safetensors.torch import save_file

    from onestep.files import file_mode

    state = original_state(stock_dir)
    index = json.loads((Path(stock_dir) / "model_index.json").read_text())
    out_file = Path(out_file)
    tmp = out_file.with_name(f".{out_file.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        save_file(state, tmp, metadata={"format": "pt", "diffusers_pipeline": index["_class_name"]})
        os.chmod(tmp, file_mode())  # safetensors writes 600
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file
