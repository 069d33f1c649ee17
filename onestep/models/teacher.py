"""The frozen teacher: a diffusers UNet or flow transformer (SD3, FLUX) and its noise schedule read out as
x0(x_t, t, condition), with guidance."""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from torch import nn

from onestep.models.conditioning import Condition
from onestep.models.schedules import schedule_of
from onestep.models.unet import takes_text, unet_x0
from onestep.pipelines.pipeline_onestep import (
    encode_text,
    flow_encode_prompt,
    flow_image_seq_len,
    flow_latent_shape,
    image_size,
    is_flow_transformer,
    sdxl_time_ids,
    takes_added_conditions,
)


def classifier_free_guidance(x0_uncond: torch.Tensor, x0_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """x̂ = x̂_u + s (x̂_c − x̂_u) (Ho & Salimans 2022); s = 1 is the conditional model."""
    return x0_uncond + scale * (x0_cond - x0_uncond)


def _place(module: nn.Module, device: torch.device | str) -> None:
    """`module.to(device)` as a forward hook: returning None keeps the call's inputs and output as they are."""
    module.to(device)


class Teacher(nn.Module):
    """A frozen diffusers diffusion model giving guided x0-predictions.

    Args:
        unet: `UNet2DModel`, `UNet2DConditionModel`, or any module with that call signature; or a flow transformer
            (`SD3Transformer2DModel`, `FluxTransformer2DModel`), kept under the same name (the denoiser).
        scheduler: a DDPM-family diffusers scheduler (supplies `alphas_cumprod` and `prediction_type`), or a
            `FlowMatchEulerDiscreteScheduler` for a flow transformer (onestep.models.schedules.FlowSchedule).
        vae: optional `AutoencoderKL` for latent models (encode/decode with its scaling factor).
        text_encoder, tokenizer: optional CLIP-style text encoder for text-conditional models.
        num_classes: number of real classes of a class-conditional model; label `num_classes` is the null class.
        guidance_scale: default classifier-free guidance scale (1 = none).
        frozen: put the networks in eval mode without gradients (the default; a teacher is never trained).
        text_encoder_2, tokenizer_2: SDXL's second text encoder (`CLIPTextModelWithProjection`): prompts then also
            give the pooled embedding and the time ids of the teacher's resolution (`encode_prompts`).
        force_zeros_for_empty_prompt: the unconditional text condition is zeros rather than the empty prompt's, as
            diffusers' SDXL pipeline does when its `model_index.json` says so (SDXL base does).
        text_encoder_3, tokenizer_3: SD3's T5 encoder (optional there; FLUX's T5 is its text_encoder_2).

    A flow transformer with embedded guidance (FLUX.1-dev, `guidance_embeds`) is guided through its `guidance`
    input at `guidance_scale` (every Condition of its prompts carries it): no unconditional branch. Other flow
    transformers (SD3, FLUX.1-schnell) use classifier-free guidance as UNets do.
    """

    def __init__(self, unet: nn.Module, scheduler, vae: nn.Module | None = None, text_encoder: nn.Module | None = None,
                 tokenizer=None, num_classes: int | None = None, guidance_scale: float = 1.0, frozen: bool = True,
                 *, text_encoder_2: nn.Module | None = None, tokenizer_2=None,
                 force_zeros_for_empty_prompt: bool = False, text_encoder_3: nn.Module | None = None,
                 tokenizer_3=None):
        super().__init__()
        # frozen=False only for a view on a network still in training (periodic evaluation of teacher training).
        self.unet = unet.eval().requires_grad_(False) if frozen else unet
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.text_encoder = text_encoder.eval().requires_grad_(False) if text_encoder is not None else None
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False) if text_encoder_2 is not None else None
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_3 = text_encoder_3.eval().requires_grad_(False) if text_encoder_3 is not None else None
        self.tokenizer_3 = tokenizer_3
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.scheduler = scheduler
        self.is_flow = is_flow_transformer(unet)
        self.schedule = schedule_of(scheduler, flow_image_seq_len(self.sample_shape) if self.is_flow else None)
        if num_classes is None and getattr(unet.config, "num_class_embeds", None):
            num_classes = unet.config.num_class_embeds - 1  # the last embedding is the null class
        self.num_classes = num_classes
        self.guidance_scale = guidance_scale
        self._null_text: Condition | None = None
        self.execution_device: torch.device | None = None  # set by `offload`: where the UNet runs, not where it is
        # set by `from_pretrained`: the folder (and weights variant) it was read from, whose own files of the frozen
        # components (VAE, text encoders, tokenizers) the exports carry unchanged (onestep.export.frozen)
        self.source: os.PathLike | None = None
        self.source_variant: str | None = None

    # --- construction -----------------------------------------------------------------------------------------
    def with_unet(self, unet: nn.Module, frozen: bool = True) -> Teacher:
        """This teacher (scheduler, VAE, text encoders, classes, guidance) around another UNet, frozen unless told
        (a view on a network in training)."""
        view = Teacher(unet, self.scheduler, self.vae, self.text_encoder, self.tokenizer, self.num_classes,
                       self.guidance_scale, frozen, text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                       force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
                       text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3)
        view.source, view.source_variant = self.source, self.source_variant
        return view

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, guidance_scale: float = 1.0,
                        dtype: torch.dtype = torch.float32, allow_pickle: bool = False, variant: str | None = None,
                        revision: str | None = None, config: str | os.PathLike | None = None) -> Teacher:
        """Read a standard diffusers folder (`unet/`, `scheduler/`, optional `vae/`, `text_encoder/`, `tokenizer/`,
        `text_encoder_2/`, `tokenizer_2/`): a local folder, a builtin (`builtin:digits`, `-t2i`, `-flow`), or a Hub
        id already in the local Hugging Face cache (`revision` picks its snapshot; nothing is downloaded).

        Weights load from safetensors only (`variant`, e.g. "fp16", picks `*.fp16.safetensors`);
        `allow_pickle=True` accepts `.bin` files you trust.

        `path` may also be a single-file checkpoint in the original SD / SDXL layout (`model.safetensors`); `config`
        then names a diffusers folder of its model type for the configs and tokenizers (see `load_single_file`).
        """
        from onestep.models.loading import load_diffusers_folder, load_single_file, resolve_model

        folder = resolve_model(path, revision)
        if folder.is_file() or (folder.suffix in (".safetensors", ".ckpt") and not folder.exists()):
            return cls(**load_single_file(folder, config, dtype=dtype, allow_pickle=allow_pickle),
                       guidance_scale=guidance_scale)  # no component files to export as they are: saved anew
        parts = load_diffusers_folder(folder, dtype=dtype, allow_pickle=allow_pickle, variant=variant)
        teacher = cls(**parts, guidance_scale=guidance_scale)
        teacher.source, teacher.source_variant = folder, variant
        return teacher

    # --- shapes -----------------------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model space (latents for latent models; FLUX's unpacked)."""
        if is_flow_transformer(self.unet):
            return flow_latent_shape(self.unet, self.vae)
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return cfg.in_channels, size, size

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels: the training resolution (SDXL's time ids name it)."""
        if self.is_flow:
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            return self.sample_shape[1] * factor, self.sample_shape[2] * factor
        return image_size(self.unet, self.vae)

    @property
    def embedded_guidance(self) -> bool:
        """Guided through the network's own `guidance` input (FLUX.1-dev) instead of classifier-free guidance."""
        return bool(getattr(self.unet.config, "guidance_embeds", False))

    def text_parts(self) -> dict:
        """The text encoders and tokenizers by their pipeline names."""
        return {name: getattr(self, name) for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                                       "text_encoder_3", "tokenizer_3")}

    @property
    def is_text(self) -> bool:
        return takes_text(self.unet)

    @property
    def device(self) -> torch.device:
        """Where the teacher computes (and its callers put their inputs)."""
        return self.execution_device or next(self.unet.parameters()).device

    def offload(self, device: torch.device | str) -> None:
        """Keep the UNet's weights in CPU memory and move them to `device` for each of its calls only: transfer time
        for memory, when the teacher does not fit beside the trained networks. The Trainer leaves an offloaded
        teacher where it is. A call that is differentiated (SiD's generator loss) holds the weights it used on
        `device` until its backward pass; the VAE and text encoders stay on `device`."""
        self.execution_device = torch.device(device)
        for part in (self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3):
            if part is not None:
                part.to(self.execution_device)
        self.unet.to("cpu")
        self.unet.register_forward_pre_hook(lambda unet, args: _place(unet, self.execution_device))
        self.unet.register_forward_hook(lambda unet, args, output: _place(unet, "cpu"))

    # --- conditions -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Condition:
        """The Condition of each prompt, computed as diffusers' pipelines do (`encode_text`; prompts longer than
        the tokenizer's maximum are truncated with a warning): the prompt embeddings, and for SDXL the pooled
        embedding and the time ids of the teacher's resolution (uncropped); for flow transformers the pipeline's own
        `encode_prompt` (`flow_condition`). Float32, on the teacher's device."""
        if self.is_flow:
            return self.flow_condition(list(prompts))
        encoders = [(encoder, tokenizer) for encoder, tokenizer in ((self.text_encoder, self.tokenizer),
                                                                    (self.text_encoder_2, self.tokenizer_2))
                    if encoder is not None]
        if not encoders or any(tokenizer is None for _, tokenizer in encoders):
            raise ValueError("this teacher has no text encoder/tokenizer; it cannot take prompts")
        hidden, pooled = encode_text(list(prompts), encoders, self.device)
        if not takes_added_conditions(self.unet):
            return Condition(encoder_hidden_states=hidden.float())
        if pooled is None:
            raise ValueError("this UNet takes SDXL's pooled text embedding; the teacher needs text_encoder_2")
        return Condition(encoder_hidden_states=hidden.float(), text_embeds=pooled.float(),
                         time_ids=sdxl_time_ids(self.image_size, len(prompts), self.device))

    def flow_condition(self, prompts: list[str]) -> Condition:
        """SD3's / FLUX's prompt embeddings and pooled embeddings as `encode_prompt` of their pipelines computes
        them, FLUX's text ids (one row per prompt) and FLUX.1-dev's embedded guidance at `guidance_scale`."""
        hidden, pooled, txt_ids = flow_encode_prompt(self.unet, self.text_parts(), prompts, self.device)
        n = len(prompts)
        ids = None if txt_ids is None else txt_ids.float().expand(n, *txt_ids.shape)
        guidance = torch.full((n,), float(self.guidance_scale), device=self.device) if self.embedded_guidance else None
        return Condition(encoder_hidden_states=hidden.float(), text_embeds=pooled.float(), txt_ids=ids,
                         guidance=guidance)

    def condition(self, class_labels: torch.Tensor | None = None, prompts: list[str] | None = None) -> Condition:
        if prompts is not None:
            return self.encode_prompts(prompts)
        if class_labels is not None and self.num_classes is None:
            raise ValueError("class labels given to a teacher that is not class-conditional")
        return Condition(class_labels=class_labels)

    def unconditional(self, n: int) -> Condition:
        """n null conditions (null class / empty prompt), e.g. for real images without labels or captions."""
        if self.num_classes is not None:
            return Condition(class_labels=torch.full((n,), self.num_classes, device=self.device))
        if self.is_text:
            return self.null_text().expand(n)
        return Condition()

    def null_text(self) -> Condition:
        """The unconditional text condition, batch 1: the empty prompt's, or zero embeddings where the teacher
        follows diffusers' `force_zeros_for_empty_prompt` (time ids as for any prompt)."""
        if self._null_text is None:
            empty = self.encode_prompts([""])
            if self.force_zeros_for_empty_prompt:
                empty = replace(empty, encoder_hidden_states=torch.zeros_like(empty.encoder_hidden_states),
                                text_embeds=None if empty.text_embeds is None else torch.zeros_like(empty.text_embeds))
            self._null_text = empty
        return self._null_text

    def null_condition(self, condition: Condition) -> Condition:
        """The unconditional counterpart: null class label (index num_classes) and/or the unconditional text
        embeddings (`null_text`); SDXL's time ids, FLUX's text ids and embedded guidance stay the condition's, as
        diffusers keeps them for the negative prompt."""
        null = {}
        if condition.class_labels is not None:
            null["class_labels"] = torch.full_like(condition.class_labels, self.num_classes)
        if condition.encoder_hidden_states is not None:
            text = self.null_text().to(condition.encoder_hidden_states.device)
            text = text.expand(condition.encoder_hidden_states.shape[0])
            null.update(encoder_hidden_states=text.encoder_hidden_states, text_embeds=text.text_embeds,
                        time_ids=condition.time_ids, txt_ids=condition.txt_ids, guidance=condition.guidance)
        return Condition(**null)

    # --- prediction -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def x0(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition,
           guidance_scale: float | None = None) -> torch.Tensor:
        """Guided x0-prediction in float32; conditional and unconditional passes run as one batch."""
        return self.x0_with_grad(x_t, t, condition, guidance_scale)

    def x0_with_grad(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition,
                     guidance_scale: float | None = None) -> torch.Tensor:
        """As `x0`, but lets gradients flow to x_t (SiD/SFD differentiate through the teacher's input)."""
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        if scale == 1.0 or condition.is_empty or self.embedded_guidance:  # embedded: in `condition.guidance`
            return unet_x0(self.unet, self.schedule, x_t, t, condition)
        t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
        both = Condition.cat([self.null_condition(condition), condition])
        x0_u, x0_c = unet_x0(self.unet, self.schedule, torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        return classifier_free_guidance(x0_u, x0_c, scale)

    # --- latent space -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to model space (VAE latents times the scaling factor; identity for pixel models)."""
        if self.vae is None:
            return images
        return self.sample_latents(self.encode_moments(images))

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """The VAE posterior of images in [-1, 1]: mean and log-variance stacked on channels (2C, what a latent cache
        stores)."""
        return self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist.parameters

    def sample_latents(self, moments: torch.Tensor) -> torch.Tensor:
        """One draw from the VAE posterior with these moments, in model space (times the scaling factor)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        latents = DiagonalGaussianDistribution(moments.to(self.device, self.vae.dtype)).sample()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model space to images in [-1, 1]."""
        if self.vae is None:
            return latents
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents / self.vae.config.scaling_factor + shift
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float()
