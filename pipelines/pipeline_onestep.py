"""One-step (or few-step) generator distilled from a diffusion UNet, as a self-contained diffusers pipeline.

This file imports only torch and diffusers: every exported folder carries a copy of it and loads with
plain diffusers (`custom_pipeline=..., trust_remote_code=True`) where onestep is not installed.

Convention: VP discrete time t in {0..T-1}, x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(alphas_cumprod[t]),
sigma_t = sqrt(1 - alphas_cumprod[t]); the generator is read out as an x0-prediction by the scheduler's
`prediction_type`, in float32. Images live in [-1, 1] in model space and come out in [0, 1].

Two read-outs (`readout` in the config; folders without it are "x0"):
  "x0"      DMD2/SiD-style generators: x = sigma_{t_0} z, x0 = G(x, t_0) read out at t_0 (the recursion below);
            with `input_scaling` "unit" (folders without it are "sigma") the first input is z itself, as DMD2's
            SDXL one-step student (conditioning timestep 399 on unit-variance noise).
  "signal"  BOOT students g(eps, t): the UNet sees the noise eps itself at timestep t and its output is read out
            as x0 at the terminal timestep T-1 (as if eps were x_{T-1}); g(eps, t) is the signal y_t of the
            teacher's DDIM trajectory from eps, and the sample is y at the one configured timestep (0).

Text conditioning is computed as diffusers' Stable Diffusion pipelines compute it (`encode_text`, `sdxl_time_ids`);
onestep's Teacher calls these same functions in training, so a prompt conditions the exported student exactly as
it conditioned the student in training.

Flow students (the generator an `SD3Transformer2DModel` / `FluxTransformer2DModel`, the scheduler a
`FlowMatchEulerDiscreteScheduler`) use rectified flow instead (see "flow-matching transformers" below): alpha_t =
1 - s_t, sigma_t = s_t on the scheduler's shifted training grid, velocity read-out x0 = x_t - s_t v, prompts encoded
by StableDiffusion3Pipeline's / FluxPipeline's own `encode_prompt`, and FLUX.1-dev's embedded guidance at the
configured `embedded_guidance` (the teacher's in training). The one-step student is x0 = z - v(z, t = 1).
"""

from __future__ import annotations

import inspect
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FluxTransformer2DModel,
    ImagePipelineOutput,
    SchedulerMixin,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor


logger = logging.get_logger(__name__)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
READOUTS = ("x0", "signal")
INPUT_SCALINGS = ("sigma", "unit")


def tokenize(tokenizer, prompt: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's max length. A longer prompt is truncated, as diffusers' pipelines do, with
    a one-line warning on diffusers' logger naming what it loses (once per prompt and tokenizer: a training run draws
    the same prompts again and again); transformers' own warning about the untruncated length is left out."""
    max_length = tokenizer.model_max_length
    warned = tokenizer.__dict__.setdefault("_truncated_prompts", set())
    for text, ids in zip(prompt, tokenizer(prompt, verbose=False).input_ids, strict=True):
        if len(ids) > max_length and text not in warned:
            warned.add(text)
            lost = tokenizer.decode(ids[max_length - 1:-1])
            logger.warning(f"prompt truncated to {max_length} tokens (CLIP can only handle sequences up to "
                           f"{max_length} tokens): {text!r} loses {lost!r}")
    return tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_text(prompt: list[str], encoders: list[tuple], device: torch.device | str) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor | None]:
    """(prompt embeddings, pooled embeddings) from (text encoder, tokenizer) pairs, as diffusers computes them.

    One encoder (SD 1.x/2.x): its last hidden state, no pooled embedding. Two (SDXL): both encoders' penultimate
    hidden states concatenated along the features, and the pooled (projected) embedding of the last encoder that
    gives one (`CLIPTextModelWithProjection`).
    """
    if len(encoders) == 1:
        encoder, tokenizer = encoders[0]
        return encoder(tokenize(tokenizer, prompt).to(device))[0], None
    hidden, pooled = [], None
    for encoder, tokenizer in encoders:
        out = encoder(tokenize(tokenizer, prompt).to(device), output_hidden_states=True)
        if out[0].ndim == 2:
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def image_size(unet: UNet2DModel | UNet2DConditionModel, vae: AutoencoderKL | None) -> tuple[int, int]:
    """(height, width) in pixels of what the UNet generates: its sample size times the VAE's downsampling."""
    size = unet.config.sample_size
    height, width = size if isinstance(size, (list, tuple)) else (size, size)
    factor = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
    return height * factor, width * factor


def sdxl_time_ids(size: tuple[int, int], batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """SDXL's micro-conditioning (original size, crop top-left, target size) for uncropped images of `size`: the
    (batch_size, 6) float32 `time_ids` diffusers' SDXL pipeline passes by default."""
    height, width = size
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=device).expand(
        batch_size, 6)


def takes_added_conditions(unet: UNet2DModel | UNet2DConditionModel) -> bool:
    """True for SDXL-style UNets: pooled text embeddings and time ids enter through `added_cond_kwargs`."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


# --- flow-matching transformers (SD3/SD3.5, FLUX.1) ----------------------------------------------------------------
# The generator network may be an `SD3Transformer2DModel` or a `FluxTransformer2DModel` on the rectified-flow schedule
# of a `FlowMatchEulerDiscreteScheduler`: grid time t in {0..T-1} has noise level s_t (the scheduler's training sigma
# (t + 1) / T, shifted as its pipeline shifts it), x_t = (1 - s_t) x0 + s_t eps, the transformer predicts the velocity
# v = eps - x0 at timestep s_t * T, so x0 = x_t - s_t v. Prompts are encoded by the diffusers pipelines' own
# `encode_prompt`; FLUX's latents are packed into 2x2 patches with image ids as `FluxPipeline` packs them.
FLOW_PIPELINES = {"SD3Transformer2DModel": "StableDiffusion3Pipeline", "FluxTransformer2DModel": "FluxPipeline"}


def is_flow_transformer(model) -> bool:
    """True for the flow-matching transformers onestep supports (SD3's and FLUX's)."""
    return isinstance(model, (SD3Transformer2DModel, FluxTransformer2DModel))


def is_flux(model) -> bool:
    return isinstance(model, FluxTransformer2DModel)


def flow_sigmas(scheduler, image_seq_len: int | None = None) -> torch.Tensor:
    """The training sigmas s_t, t = 0..T-1 (float64, increasing to 1) of a `FlowMatchEulerDiscreteScheduler`: (t+1)/T
    shifted as its pipeline shifts them, statically (`shift`, SD3) or by the image's sequence length
    (`use_dynamic_shifting`, FLUX: `time_shift(mu)` with `mu = calculate_shift(image_seq_len)` as `FluxPipeline`)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = scheduler.config
    unsupported = [k for k in ("shift_terminal", "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas",
                               "use_beta_sigmas", "stochastic_sampling") if cfg.get(k)]
    if unsupported:
        raise ValueError(f"flow scheduler options not supported: {', '.join(unsupported)}")
    T = cfg.num_train_timesteps
    base = torch.arange(1, T + 1, dtype=torch.float64) / T
    if cfg.get("use_dynamic_shifting"):
        if image_seq_len is None:
            raise ValueError("a dynamically shifted flow schedule needs the image sequence length")
        mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        return scheduler.time_shift(mu, 1.0, base)
    shift = cfg.shift
    return shift * base / (1 + (shift - 1) * base)


def flow_latent_shape(transformer, vae) -> tuple[int, int, int]:
    """(C, H, W) of a flow transformer's latents at its default resolution (unpacked for FLUX: in_channels / 4
    channels, the VAE's sample size over its down-scaling)."""
    cfg = transformer.config
    if is_flux(transformer):
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        size = vae.config.sample_size if isinstance(vae.config.sample_size, int) else vae.config.sample_size[0]
        return cfg.in_channels // 4, size // factor, size // factor
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return cfg.in_channels, size, size


def flow_image_seq_len(shape: tuple[int, ...]) -> int:
    """Tokens of (C, H, W) latents in 2x2 patches (SD3's patch size, FLUX's packing): what FLUX's shift reads."""
    return (shape[-2] // 2) * (shape[-1] // 2)


def flow_prompt_pipeline(transformer, text_parts: dict):
    """A `StableDiffusion3Pipeline` / `FluxPipeline` over these text encoders and tokenizers (no VAE, no scheduler),
    to encode prompts with its own `encode_prompt`."""
    import diffusers

    pipeline_cls = getattr(diffusers, FLOW_PIPELINES[type(transformer).__name__.removeprefix("FSDP")])
    names = [n for n in inspect.signature(pipeline_cls.__init__).parameters
             if n.startswith(("text_encoder", "tokenizer"))]
    extra = {"image_encoder": None, "feature_extractor": None} if not is_flux(transformer) else {}
    return pipeline_cls(transformer=transformer, scheduler=None, vae=None,
                        **{n: text_parts.get(n) for n in names}, **extra)


def flow_encode_prompt(transformer, text_parts: dict, prompt: list[str], device) -> tuple[torch.Tensor, torch.Tensor,
                                                                                              torch.Tensor | None]:
    """(prompt embeddings, pooled embeddings, FLUX's text ids or None) as the pipeline's `encode_prompt` computes them
    (SD3: CLIP-L and CLIP-G penultimate states beside T5's, or zeros without T5; FLUX: T5 states, CLIP pooled)."""
    pipeline = flow_prompt_pipeline(transformer, text_parts)
    length = flow_max_sequence_length(transformer, text_parts)
    if is_flux(transformer):
        return pipeline.encode_prompt(prompt=prompt, prompt_2=None, device=device, max_sequence_length=length)
    embeds, _, pooled, _ = pipeline.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False, max_sequence_length=length)
    return embeds, pooled, None


def flow_max_sequence_length(transformer, text_parts: dict) -> int:
    """T5's token count: the pipeline's default `max_sequence_length` (SD3 256, FLUX 512), at most the T5 tokenizer's
    own maximum (the published tokenizers allow 512; a tiny test tokenizer fewer). Pass it to the stock pipeline."""
    tokenizer = text_parts.get("tokenizer_2" if is_flux(transformer) else "tokenizer_3")
    default = 512 if is_flux(transformer) else 256
    return default if tokenizer is None else min(default, tokenizer.model_max_length)


def flow_transformer_call(transformer, x_t: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                          pooled_projections: torch.Tensor, txt_ids: torch.Tensor | None = None,
                          guidance: torch.Tensor | None = None) -> torch.Tensor:
    """The transformer's velocity at (B, C, H, W) latents x_t and `timestep` s * T (B,), in its dtype, called as its
    pipeline calls it: SD3 on the latents; FLUX on packed latents with image ids, `timestep / 1000` and the
    embedded `guidance` (FLUX.1-dev), unpacked again."""
    dtype = transformer.dtype
    text = {"encoder_hidden_states": encoder_hidden_states.to(dtype),
            "pooled_projections": pooled_projections.to(dtype)}
    if not is_flux(transformer):
        return transformer(hidden_states=x_t.to(dtype), timestep=timestep, **text, return_dict=False)[0]
    from diffusers import FluxPipeline

    b, c, h, w = x_t.shape
    packed = FluxPipeline._pack_latents(x_t.to(dtype), b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, dtype)
    if txt_ids is None:
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=x_t.device, dtype=dtype)
    out = transformer(hidden_states=packed, timestep=timestep.to(dtype) / 1000, guidance=guidance, **text,
                      txt_ids=txt_ids[0] if txt_ids.dim() == 3 else txt_ids, img_ids=img_ids, return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h, w, 1)


@dataclass
class OneStepPipelineOutput(ImagePipelineOutput):
    """`images`, plus for a signal read-out called with `preview_timesteps` the `trajectory` {t: images of y_t}
    from the same noise, in the same `output_type`."""

    trajectory: dict | None = None


class OneStepPipeline(DiffusionPipeline):
    r"""Sample a distilled generator in one network call (or a few: DMD2's multi-step generator).

    For timesteps t_0 > t_1 > ... the generator runs x = sigma_{t_0} z, x0 = G(x, t_0), and for each next t_i
    re-noises x = alpha_{t_i} x0 + sigma_{t_i} eps with fresh noise eps before reading out x0 = G(x, t_i) again.

    Args:
        unet ([`UNet2DModel`] or [`UNet2DConditionModel`]): the generator; class-conditional through `class_labels`
            when it has class embeddings, text-conditional through `prompt` when it has cross-attention. A flow
            student's [`SD3Transformer2DModel`] / [`FluxTransformer2DModel`] sits in this slot too.
        scheduler ([`SchedulerMixin`]): a DDPM-family scheduler; supplies only `alphas_cumprod` and `prediction_type`
            (a flow student's `FlowMatchEulerDiscreteScheduler`: its shifted training sigmas).
        text_encoder_3, tokenizer_3 (*optional*): SD3's T5 encoder; embedded_guidance (`float`, *optional*):
            FLUX.1-dev students' guidance input (the teacher's in training).
        vae ([`AutoencoderKL`], *optional*): decoder of a latent generator (`latents / scaling_factor` is decoded).
        text_encoder ([`~transformers.CLIPTextModel`], *optional*), tokenizer ([`~transformers.CLIPTokenizer`],
            *optional*): the teacher's text encoder for text-to-image generators (last hidden state, padded to the
            tokenizer's max length).
        text_encoder_2 ([`~transformers.CLIPTextModelWithProjection`], *optional*), tokenizer_2 (*optional*): SDXL's
            second text encoder: with it the prompt embeddings are both encoders' penultimate hidden states, and the
            UNet also gets the pooled embedding and the time ids of its own resolution (see `encode_text`).
        timesteps (`list[int]`, defaults to `[999]`): the generator's read-out timesteps, decreasing; one = one step.
        num_classes (`int`, *optional*): real classes of a class-conditional generator, the class index
            `num_classes` being the null class; read from `unet.config.num_class_embeds - 1` when not given.
        readout (`str`, defaults to `"x0"`): `"x0"` for the recursion above; `"signal"` for a BOOT student, one
            call y = G(z, t_0) read out at the terminal timestep with z itself as input (see the module docstring).
        input_scaling (`str`, defaults to `"sigma"`): the x0 read-out's first input, `"sigma"` = sigma_{t_0} z or
            `"unit"` = z itself (a generator trained on unit-variance noise at t_0, as DMD2's SDXL student).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->unet->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                            "tokenizer_3"]
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(self, unet: UNet2DModel | UNet2DConditionModel | SD3Transformer2DModel | FluxTransformer2DModel,
                 scheduler: SchedulerMixin,
                 vae: AutoencoderKL | None = None, text_encoder=None, tokenizer=None,
                 timesteps: list[int] | tuple[int, ...] = (999,), num_classes: int | None = None,
                 readout: str = "x0", text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
                 embedded_guidance: float | None = None, input_scaling: str = "sigma"):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
                              tokenizer_3=tokenizer_3)
        if embedded_guidance is not None:  # FLUX.1-dev students: the guidance their transformer was trained at
            self.register_to_config(embedded_guidance=float(embedded_guidance))
        if num_classes is None and getattr(unet.config, "num_class_embeds", None):
            num_classes = unet.config.num_class_embeds - 1
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        if input_scaling not in INPUT_SCALINGS:
            raise ValueError(f"input_scaling must be one of {INPUT_SCALINGS}, got {input_scaling!r}")
        steps = self.check_timesteps(timesteps, readout)
        self.register_to_config(timesteps=steps, num_classes=num_classes, readout=readout,
                                input_scaling=input_scaling)
        self.vae_scale_factor = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_resize=False)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """diffusers' `save_pretrained`, plus this file beside `model_index.json`, so that the saved folder loads
        again with plain diffusers (`custom_pipeline="pipeline_onestep", trust_remote_code=True`)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        source = inspect.getfile(type(self))
        shutil.copyfile(source, os.path.join(save_directory, os.path.basename(source)))

    # --- schedule -----------------------------------------------------------------------------------------------
    def check_timesteps(self, timesteps: list[int] | tuple[int, ...], readout: str = "x0") -> list[int]:
        """`timesteps` as a list of ints, checked to be strictly decreasing within [0, T) (one for a signal)."""
        steps = [int(t) for t in timesteps]
        num_train = self.num_train_timesteps
        decreasing = all(a > b for a, b in zip(steps, steps[1:], strict=False))
        if not steps or not decreasing or any(not 0 <= t < num_train for t in steps):
            raise ValueError(f"timesteps must be strictly decreasing integers in [0, {num_train}), got {timesteps}")
        if readout == "signal" and len(steps) != 1:
            raise ValueError(f"a signal read-out samples in one call, at one timestep; got {timesteps}")
        return steps

    @property
    def is_flow(self) -> bool:
        """A flow-matching transformer student (rectified flow; see the module docstring)."""
        return is_flow_transformer(self.unet)

    @property
    def num_train_timesteps(self) -> int:
        if self.is_flow:
            return self.scheduler.config.num_train_timesteps
        return len(self.scheduler.alphas_cumprod)

    def flow_sigma(self, t: int) -> torch.Tensor:
        """s_t of a flow student, float64: the training grid at its own resolution (FLUX's shift depends on it)."""
        return flow_sigmas(self.scheduler, flow_image_seq_len(self.sample_shape))[t]

    def network(self, x: torch.Tensor, t: int, unet_kwargs: dict) -> torch.Tensor:
        """The generator network's raw output at grid time t: a UNet at timestep t; a flow transformer at s_t * T."""
        if self.is_flow:
            time = (self.flow_sigma(t) * self.num_train_timesteps).float().to(x.device).expand(x.shape[0])
            return flow_transformer_call(self.unet, x, time, **unet_kwargs)
        timestep = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return self.unet(x.to(self.unet.dtype), timestep, **unet_kwargs, return_dict=False)[0]

    def alpha_sigma(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) as float32 scalars, computed from `alphas_cumprod` (flow: 1 - s_t, s_t) in float64."""
        if self.is_flow:
            s = self.flow_sigma(t)
            return (1 - s).float(), s.float()
        abar = torch.as_tensor(self.scheduler.alphas_cumprod, dtype=torch.float64)[t]
        return abar.sqrt().float(), (1 - abar).sqrt().float()

    def to_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """x0 from the network output by the scheduler's `prediction_type`, in float32."""
        alpha, sigma = (v.to(x_t.device) for v in self.alpha_sigma(t))
        out, x = model_output.float(), x_t.float()
        if self.is_flow:  # a velocity v = eps - x0
            return x - sigma * out
        kind = self.scheduler.config.prediction_type
        if kind == "sample":
            return out
        if kind == "v_prediction":
            return alpha * x - sigma * out
        if kind == "epsilon":
            return (x - sigma * out) / alpha.clamp_min(1e-8)  # undefined at a zero-terminal-SNR t = T-1
        raise ValueError(f"unsupported prediction_type {kind!r}")

    # --- generation -----------------------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the generator's output (latents for a latent generator; FLUX's unpacked)."""
        if self.is_flow:
            return flow_latent_shape(self.unet, self.vae)
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
        return cfg.in_channels, size[0], size[1]

    def model_shape(self, height: int | None, width: int | None) -> tuple[int, int, int]:
        """(C, H, W) in model space for an image of height x width pixels (default: the generator's own size)."""
        channels, h, w = self.sample_shape
        f = self.vae_scale_factor
        height, width = height or h * f, width or w * f
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height} x {width}")
        return channels, height // f, width // f

    def prepare_class_labels(self, class_labels: list[int] | torch.Tensor | None,
                             batch_size: int) -> torch.Tensor | None:
        """Checked labels on the execution device; balanced over the classes when none are given."""
        num_classes = self.config.num_classes
        if num_classes is None:
            if class_labels is not None:
                raise ValueError("class_labels given to a generator that is not class-conditional")
            return None
        if class_labels is None:
            class_labels = torch.arange(batch_size) % num_classes
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class_labels must be non-empty ints in [0, {num_classes}), got {class_labels}")
        return labels.to(self._execution_device)

    @torch.no_grad()
    def encode_prompt(self, prompt: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt embeddings, pooled embeddings or None), as the teacher computed them in training."""
        if self.is_flow:
            parts = {name: getattr(self, name) for name in ("text_encoder", "tokenizer", "text_encoder_2",
                                                            "tokenizer_2", "text_encoder_3", "tokenizer_3")}
            return flow_encode_prompt(self.unet, parts, prompt, self._execution_device)[:2]
        encoders = [(encoder, tokenizer) for encoder, tokenizer in ((self.text_encoder, self.tokenizer),
                                                                    (self.text_encoder_2, self.tokenizer_2))
                    if encoder is not None]
        if not encoders or any(tokenizer is None for _, tokenizer in encoders):
            raise ValueError("prompt given to a pipeline without a text encoder and tokenizer")
        return encode_text(prompt, encoders, self._execution_device)

    def unet_kwargs(self, class_labels: torch.Tensor | None, prompt_embeds: torch.Tensor | None = None,
                    pooled_prompt_embeds: torch.Tensor | None = None, size: tuple[int, int] | None = None) -> dict:
        """Conditioning keywords of the UNet call: class labels and/or prompt embeddings, and for SDXL-style UNets
        the pooled embeddings and the time ids of `size` (height, width in pixels; default the generator's own)
        as `added_cond_kwargs`, in the UNet's dtype. A flow transformer takes the prompt and pooled embeddings (both
        needed) and FLUX.1-dev its embedded guidance."""
        if self.is_flow:
            if prompt_embeds is None or pooled_prompt_embeds is None:
                raise ValueError("a flow transformer needs a prompt (or prompt_embeds with pooled_prompt_embeds)")
            guidance = None
            if getattr(self.unet.config, "guidance_embeds", False):
                guidance = torch.full((len(prompt_embeds),), self.config.get("embedded_guidance", 3.5),
                                      device=prompt_embeds.device, dtype=torch.float32)
            return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds,
                    "guidance": guidance}
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        if "encoder_hidden_states" in inspect.signature(self.unet.forward).parameters:
            cfg = self.unet.config
            cross_attends = any("CrossAttn" in (block or "") for block in (*cfg.down_block_types, cfg.mid_block_type))
            if cross_attends and prompt_embeds is None:
                raise ValueError(f"this UNet cross-attends to text; call {type(self).__name__} with a prompt")
            # None: a UNet2DConditionModel without cross-attention
            kwargs["encoder_hidden_states"] = None if prompt_embeds is None else prompt_embeds.to(self.unet.dtype)
        if takes_added_conditions(self.unet):
            if pooled_prompt_embeds is None:
                raise ValueError("this UNet takes SDXL's pooled text embedding: give a prompt (the pipeline needs "
                                 "text_encoder_2) or pooled_prompt_embeds")
            time_ids = sdxl_time_ids(size or image_size(self.unet, self.vae), len(pooled_prompt_embeds),
                                     pooled_prompt_embeds.device)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled_prompt_embeds.to(self.unet.dtype),
                                           "time_ids": time_ids.to(self.unet.dtype)}
        return kwargs

    def predict_x0(self, x_t: torch.Tensor, t: int, unet_kwargs: dict) -> torch.Tensor:
        """One generator call at timestep t, read out as x0 in float32."""
        return self.to_x0(self.network(x_t, t, unet_kwargs), x_t, t)

    def predict_signal(self, noise: torch.Tensor, t: int, unet_kwargs: dict) -> torch.Tensor:
        """A BOOT student's y_t: the UNet on the noise itself at timestep t, read out as x0 at T-1, in float32."""
        return self.to_x0(self.network(noise, t, unet_kwargs), noise, self.num_train_timesteps - 1)

    def generate(self, noise: torch.Tensor, unet_kwargs: dict, timesteps: list[int],
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 on_step: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """x0 in model space (float32) from initial noise z: after the whole recursion over `timesteps` (x0
        read-out; `generator` draws its fresh noise), or y at `timesteps[0]` (signal read-out).

        `on_step(i, t, x0)`, when given, sees each step's x0 and returns the x0 the recursion goes on with."""
        on_step = on_step or (lambda i, t, x0: x0)
        if self.config.readout == "signal":
            return on_step(0, timesteps[0], self.predict_signal(noise, timesteps[0], unet_kwargs))
        device, shape = noise.device, noise.shape
        x = noise if self.config.input_scaling == "unit" else self.alpha_sigma(timesteps[0])[1].to(device) * noise
        x0 = on_step(0, timesteps[0], self.predict_x0(x, timesteps[0], unet_kwargs))
        for i, t in enumerate(timesteps[1:], start=1):
            alpha, sigma = (v.to(device) for v in self.alpha_sigma(t))
            x = alpha * x0 + sigma * randn_tensor(shape, generator, device, torch.float32)
            x0 = on_step(i, t, self.predict_x0(x, t, unet_kwargs))
        return x0

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (unclamped) from model-space samples: the VAE decodes latents when there is one."""
        if self.vae is None:
            return x0
        latents = x0 / self.vae.config.scaling_factor + (getattr(self.vae.config, "shift_factor", None) or 0.0)
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0].float()

    @staticmethod
    def check_conditions(prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None,
                         num_images_per_prompt: int, pooled_prompt_embeds: torch.Tensor | None = None) -> None:
        if prompt is not None and (prompt_embeds is not None or pooled_prompt_embeds is not None):
            raise ValueError("give prompt or prompt_embeds, not both")
        if pooled_prompt_embeds is not None and (prompt_embeds is None or len(pooled_prompt_embeds) != len(
                prompt_embeds)):
            raise ValueError("pooled_prompt_embeds go with prompt_embeds, one row per prompt")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if prompt_embeds is not None and prompt_embeds.dim() != 3:
            raise ValueError(f"prompt_embeds must be (batch, tokens, dim), got shape {tuple(prompt_embeds.shape)}")

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels: list[int] | torch.Tensor | None = None,
                 prompt: str | list[str] | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 timesteps: list[int] | None = None, output_type: str = "pil",
                 return_dict: bool = True, preview_timesteps: list[int] | None = None,
                 num_images_per_prompt: int = 1, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, height: int | None = None, width: int | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None,
                 callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
                 callback_on_step_end_tensor_inputs: list[str] = ("latents",)) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            batch_size (`int`, defaults to 1): number of images when no `class_labels` are given.
            class_labels (`list[int]` or `torch.Tensor`, *optional*): one class per image (class-conditional
                generators); defaults to `batch_size` labels cycling over all classes.
            prompt (`str` or `list[str]`, *optional*): text-to-image generators; one image per prompt (a single
                string is repeated `batch_size` times).
            generator (`torch.Generator`, *optional*): makes generation deterministic.
            timesteps (`list[int]`, *optional*): overrides the configured read-out timesteps.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (NHWC in [0, 1]), `"pt"` (NCHW in [0, 1]) or
                `"latent"` (the generator's float32 output in model space, before any VAE decoding).
            return_dict (`bool`, defaults to `True`): return an [`ImagePipelineOutput`] rather than a tuple.
            preview_timesteps (`list[int]`, *optional*): signal read-out only: also return the student's y_t at
                these t from the same noise (a trajectory preview, one extra call each) as `trajectory` {t: images}
                of a [`OneStepPipelineOutput`] (or the tuple's second item).
            num_images_per_prompt (`int`, defaults to 1): images per prompt, per prompt embedding or per class
                label (each condition repeated, in order).
            latents (`torch.Tensor`, *optional*): the standard-normal noise z to start from, (images, C, H, W) in
                model space; drawn with `generator` when not given. The generator's input is sigma_{t_0} z (z itself
                with `input_scaling` "unit").
            prompt_embeds (`torch.Tensor`, *optional*): precomputed text-encoder hidden states (batch, tokens, dim)
                instead of `prompt`.
            pooled_prompt_embeds (`torch.Tensor`, *optional*): SDXL-style generators with `prompt_embeds`: the
                pooled text embeddings (batch, dim); the time ids are those of the image size.
            height (`int`, *optional*), width (`int`, *optional*): image size in pixels; defaults to the
                generator's sample size (times the VAE's down-scaling factor).
            callback_on_step_end (`Callable`, *optional*): called after each generator step as
                `callback_on_step_end(pipe, i, t, callback_kwargs)` with the tensors named in
                `callback_on_step_end_tensor_inputs`; its returned `latents` (the step's x0) replace the step's.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): among
                `_callback_tensor_inputs`.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, "
                             f"got {sorted(unknown)}")
        self.check_conditions(prompt, prompt_embeds, num_images_per_prompt, pooled_prompt_embeds)
        readout = self.config.readout
        timesteps = self.config.timesteps if timesteps is None else self.check_timesteps(timesteps, readout)
        if preview_timesteps is not None:
            if readout != "signal":
                raise ValueError("preview_timesteps needs a signal read-out (a BOOT student)")
            num_train = self.num_train_timesteps
            if any(not 0 <= int(t) < num_train for t in preview_timesteps):
                raise ValueError(f"preview_timesteps must be integers in [0, {num_train}), got {preview_timesteps}")
        labels = self.prepare_class_labels(class_labels, batch_size)
        num_images = batch_size if labels is None else labels.numel()
        if prompt is not None:
            prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
            prompt_embeds, pooled_prompt_embeds = self.encode_prompt(prompts)
        if pooled_prompt_embeds is not None:
            pooled_prompt_embeds = pooled_prompt_embeds.to(self._execution_device, self.unet.dtype)
        if prompt_embeds is not None:
            prompt_embeds = prompt_embeds.to(self._execution_device, self.unet.dtype)
            num_images = len(prompt_embeds)
            if labels is not None and labels.numel() != num_images:
                raise ValueError(f"{labels.numel()} class labels for {num_images} prompts")
        if num_images_per_prompt > 1:
            num_images *= num_images_per_prompt
            labels = None if labels is None else labels.repeat_interleave(num_images_per_prompt)
            if prompt_embeds is not None:
                prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
            if pooled_prompt_embeds is not None:
                pooled_prompt_embeds = pooled_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        shape = (num_images, *self.model_shape(height, width))
        size = (shape[2] * self.vae_scale_factor, shape[3] * self.vae_scale_factor)
        unet_kwargs = self.unet_kwargs(labels, prompt_embeds, pooled_prompt_embeds, size)
        if latents is None:
            noise = randn_tensor(shape, generator, self._execution_device, torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            noise = latents.to(self._execution_device, torch.float32)

        def on_step(i: int, t: int, x0: torch.Tensor) -> torch.Tensor:
            if callback_on_step_end is None:
                return x0
            tensors = {"latents": x0, "prompt_embeds": prompt_embeds}
            outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
            return outputs.pop("latents", x0)

        x0 = self.generate(noise, unet_kwargs, timesteps, generator, on_step)
        images = x0 if output_type == "latent" else self.image_processor.postprocess(self.decode(x0), output_type)
        trajectory = None
        if preview_timesteps is not None:
            signals = {int(t): self.predict_signal(noise, int(t), unet_kwargs) for t in preview_timesteps}
            trajectory = {t: y if output_type == "latent" else
                          self.image_processor.postprocess(self.decode(y), output_type) for t, y in signals.items()}
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,) if trajectory is None else (images, trajectory)
        return OneStepPipelineOutput(images=images, trajectory=trajectory)
