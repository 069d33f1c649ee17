"""Real-size models without downloads: SD1.5-, SDXL-, SD3.5-medium- and FLUX.1-dev-shaped components built from
their published configs (`onestep/assets/shapes/<shape>/*.json`, sources in its README.md) with random weights, for
memory and speed measurements.

The weights are random, so these teachers are for counting bytes and seconds, never for images. The CLIP tokenizers
are CLIP tokenizers over single characters (no merges): prompts become up to 77 token ids as with the real ones; the
T5 tokenizers a Unigram model over letters (`onestep.models.tiny_folders.t5_tokenizer`) padding to 512 tokens as
the published T5-XXL tokenizer's maximum.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from onestep.errors import UserInputError


SHAPES_DIR = Path(__file__).parent.parent / "assets" / "shapes"
# tiny*: each layout at test size (dry runs, CI, `onestep tiny`); tiny is SD1.5's
# (tiny SD3 / FLUX folders: onestep.models.tiny_folders)
SHAPES = ("sd15", "sdxl", "sd35m", "flux", "tiny", "tiny_sdxl", "tiny_sd3", "tiny_flux")
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "tiny": "StableDiffusionPipeline",
             "tiny_sdxl": "StableDiffusionXLPipeline", "sd35m": "StableDiffusion3Pipeline",
             "tiny_sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "tiny_flux": "FluxPipeline"}
# components of a pipeline folder that are not stored shapes, written as absent ([null, null]) as the published
# folders list them
ABSENT = {"StableDiffusion3Pipeline": ("image_encoder", "feature_extractor"),
          "FluxPipeline": ("image_encoder", "feature_extractor")}
T5_MAX_LENGTH = 512  # the published T5-XXL tokenizers' model_max_length (SD3's tokenizer_3, FLUX's tokenizer_2)
# pipeline settings of model_index.json as the published folders have them (SDXL base: zeros for the empty prompt)
INDEX_CONFIG = {"StableDiffusionXLPipeline": {"force_zeros_for_empty_prompt": True}}


def component_configs(shape: str) -> dict[str, dict]:
    """The stored published config of each component of `shape` (unet, vae, text encoder(s), scheduler)."""
    if shape not in SHAPES:
        raise UserInputError(f"unknown model shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return {path.stem: json.loads(path.read_text()) for path in sorted((SHAPES_DIR / shape).glob("*.json"))}


def component_class(config: dict) -> tuple[str, str]:
    """(library, class) of a stored component config, as a diffusers model_index.json names it: diffusers configs
    carry `_class_name`, transformers configs `architectures`."""
    if "_class_name" in config:
        return "diffusers", config["_class_name"]
    return "transformers", config["architectures"][0]


def build_component(name: str, config: dict) -> torch.nn.Module:
    """One component with random weights, in torch's current default dtype and device (`meta` counts for free)."""
    library, class_name = component_class(config)
    if library == "diffusers":
        import diffusers

        return getattr(diffusers, class_name).from_config(config)
    import transformers

    settings = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    return getattr(transformers, class_name)(transformers.AutoConfig.for_model(config["model_type"], **settings))


def denoiser_name(configs: dict[str, dict]) -> str:
    """`transformer` for the flow pipelines, `unet` for the UNet ones."""
    return "transformer" if "transformer" in configs else "unet"


def latent_size_of(configs: dict[str, dict]) -> int:
    """The latent side a teacher of these configs trains at: the denoiser's `sample_size`, or for FLUX (whose
    transformer has none) the VAE's over its down-scaling, as `onestep.pipelines.pipeline_onestep.flow_latent_shape`
    reads it."""
    denoiser = configs[denoiser_name(configs)]
    if "sample_size" in denoiser:
        return denoiser["sample_size"]
    vae = configs["vae"]
    return vae["sample_size"] // 2 ** (len(vae["block_out_channels"]) - 1)


def with_latent_size(configs: dict[str, dict], latent_size: int) -> dict[str, dict]:
    """The configs at another latent side, every weight unchanged (SD3's `pos_embed_max_size` keeps its position
    table): the denoiser's `sample_size`, or FLUX's VAE `sample_size`."""
    name = denoiser_name(configs)
    if "sample_size" in configs[name]:
        return {**configs, name: {**configs[name], "sample_size": latent_size}}
    vae = configs["vae"]
    return {**configs, "vae": {**vae, "sample_size": latent_size * 2 ** (len(vae["block_out_channels"]) - 1)}}


def parameter_counts(shape: str) -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory, a second or two)."""
    with torch.device("meta"):
        return {name: sum(p.numel() for p in build_component(name, config).parameters())
                for name, config in component_configs(shape).items() if name != "scheduler"}


def write_tokenizer(folder: Path, max_length: int = 77) -> None:
    """A CLIP tokenizer over the 256 byte-level characters (each also word-final) and the two special tokens."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars]
                                                 + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                  model_max_length=max_length).save_pretrained(folder)


def write_tokenizers(folder: Path, configs: dict[str, dict], index: dict) -> None:
    """The tokenizer of each text encoder (`text_encoder_2` -> `tokenizer_2`): CLIP's, or T5's for a T5 encoder."""
    for name, config in configs.items():
        if name.startswith("text_encoder"):
            tokenizer = name.replace("text_encoder", "tokenizer")
            if config.get("model_type") == "t5":
                from onestep.models.tiny_folders import t5_tokenizer

                t5_tokenizer(T5_MAX_LENGTH).save_pretrained(folder / tokenizer)
                index[tokenizer] = ["transformers", "T5TokenizerFast"]
                continue
            write_tokenizer(folder / tokenizer)
            index[tokenizer] = ["transformers", "CLIPTokenizer"]


def write_random_teacher(shape: str, folder: Path, latent_size: int | None = None,
                         dtype: torch.dtype = torch.float32, seed: int = 0, leave_out: tuple[str, ...] = ()) -> Path:
    """A standard diffusers folder of `shape` with random weights (safetensors, `dtype`), loadable as a teacher.

    `latent_size` changes only a `sample_size` (`with_latent_size`: the latent side the generator draws), so a run at
    a reduced size keeps every weight of the real model. `leave_out` names components the folder lists as absent
    (SD3's optional T5, `text_encoder_3`: its pipeline then feeds zeros of T5's shape). Written once: an existing
    complete folder is reused.
    """
    folder = Path(folder)
    configs = component_configs(shape)
    if latent_size is not None:
        configs = with_latent_size(configs, latent_size)
    pipeline = PIPELINES[shape]
    index = {"_class_name": pipeline, **INDEX_CONFIG.get(pipeline, {})}
    for name in (*leave_out, *(n.replace("text_encoder", "tokenizer") for n in leave_out), *ABSENT.get(pipeline, ())):
        configs.pop(name, None)
        index[name] = [None, None]
    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in `dtype`: an SDXL UNet is 10 GB in float32
    try:
        for name, config in configs.items():
            if name == "scheduler":
                import diffusers

                scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
                scheduler.save_pretrained(folder / name)
                index[name] = ["diffusers", config["_class_name"]]
                continue
            module = build_component(name, config)
            module.save_pretrained(folder / name, safe_serialization=True)
            index[name] = list(component_class(config))
            del module
    finally:
        torch.set_default_dtype(default)
    write_tokenizers(folder, configs, index)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))  # last: marks the folder complete
    return folder


def write_random_images(folder: Path, size: int, count: int = 2, seed: int = 0) -> Path:
    """`count` random RGB PNGs of side `size` with captions in metadata.jsonl (an imagefolder: real images for a GAN
    term's shapes; their content is noise)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    captions = [json.dumps({"file_name": f"{i}.png", "text": f"random image {i}"}) for i in range(count)]
    (folder / "metadata.jsonl").write_text("\n".join(captions) + "\n")
    return folder
