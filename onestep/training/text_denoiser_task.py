"""Training a latent text-to-image teacher from captioned images: SD's recipe in miniature (`method: teacher` with
captioned data, e.g. `data.name: digits_t2i`).

The UNet (UNet2DConditionModel) learns the denoising loss on posterior samples of a trained, frozen VAE, scaled by its
`scaling_factor`, cross-attending to the hidden states of a frozen CLIP text encoder; captions are replaced by the
empty prompt with probability `label_dropout` (the null text of classifier-free guidance).

With `options.transformer` the denoiser is instead a flow-matching transformer in Stable Diffusion 3's layout
(SD3Transformer2DModel, FlowMatchEulerDiscreteScheduler, CLIP-L + CLIP-G + T5, velocity loss on the shifted grid),
exported as a stock StableDiffusion3Pipeline; the VAE's latents are then shifted and scaled to zero mean and unit
variance over the data (SD3's `shift_factor` and `scaling_factor`).

The text encoders are random and frozen, not trained jointly. SD's is frozen too (pretrained CLIP); here nothing
pretrained is available, and a frozen random transformer still maps every distinct prompt to distinct hidden states,
which cross-attention learns to read. Frozen keeps the null-text embedding fixed through training, lets the prompt
embeddings be computed once, and keeps the distillers' view (a frozen encoder) the same as for SD.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from onestep.models.denoising import denoising_loss
from onestep.models.unet import unet_forward
from onestep.training.denoiser_task import DenoiserOptions
from onestep.training.updates import LossOutput, Update


def random_text_encoder(tokenizer, seed: int, with_projection: bool = False, **config) -> CLIPTextModel:
    """A CLIPTextModel (`with_projection`: CLIPTextModelWithProjection, SD3's/SDXL's pooled embedding) of `config`,
    initialised from `seed` (without moving the global RNG), sized to `tokenizer`."""
    config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **config)
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config).eval().requires_grad_(False)


def random_t5(seed: int, words: tuple[str, ...], max_length: int, **config):
    """SD3's third encoder in miniature: a 1-layer random T5 and its tokenizer over `words`, from `seed`."""
    from onestep.models.tiny_folders import tiny_t5

    with torch.random.fork_rng(devices=[]):
        model, tokenizer = tiny_t5(seed=seed, max_length=max_length, words=words, **config)
    return model.requires_grad_(False), tokenizer


class TextDenoiserTraining:
    """x0 = scaling_factor * (z - shift_factor), z ~ q(z | image); denoising loss conditioned on the caption's text
    embedding (`words`: the caption vocabulary, for a flow teacher's T5 tokenizer)."""

    def __init__(self, options: DenoiserOptions, images: torch.Tensor, captions: list[str], batch_size: int,
                 tokenizer, evaluator=None, words: tuple[str, ...] = ()):
        from onestep.models.loading import load_model
        from onestep.models.teacher import Teacher

        if options.vae is None or not options.text_encoder:
            raise ValueError("a text-to-image teacher needs options.vae (a trained VAE folder) and "
                             "options.text_encoder (CLIPTextConfig kwargs)")
        self.options, self.batch_size, self.evaluator = options, batch_size, evaluator
        self.vae: AutoencoderKL = load_model(Path(options.vae)).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.is_flow = bool(options.transformer)
        seed = options.text_encoder_seed
        self.text_encoder = random_text_encoder(tokenizer, seed, self.is_flow, **options.text_encoder)
        with torch.no_grad():
            posterior = torch.cat([self.vae.encode(images[i:i + 512]).latent_dist.parameters
                                   for i in range(0, len(images), 512)])
        self.latent_params = posterior  # (N, 2C, h, w): mean and log-variance, a fresh z each step
        text_parts = {}
        if self.is_flow:
            if not options.text_encoder_2 or not options.text_encoder_3:
                raise ValueError("a flow (SD3-layout) teacher needs options.text_encoder_2 (CLIP-G) and "
                                 "options.text_encoder_3 (T5)")
            t5, t5_tokenizer = random_t5(seed + 2, words, tokenizer.model_max_length, **options.text_encoder_3)
            text_parts = dict(text_encoder_2=random_text_encoder(tokenizer, seed + 1, True, **options.text_encoder_2),
                              tokenizer_2=tokenizer, text_encoder_3=t5, tokenizer_3=t5_tokenizer)
            self._standardise_latents()
            self.unet = SD3Transformer2DModel(**options.transformer)
            self.scheduler = FlowMatchEulerDiscreteScheduler(**options.scheduler)
        else:
            self.unet = UNet2DConditionModel(**options.unet)
            self.scheduler = DDPMScheduler(**options.scheduler)
        self.teacher_view = Teacher(self.unet, self.scheduler, vae=self.vae, text_encoder=self.text_encoder,
                                    tokenizer=tokenizer, frozen=False, **text_parts)
        prompts = sorted(set(captions))
        self.caption_index = torch.as_tensor([prompts.index(c) for c in captions])
        self.prompt_conditions = self.teacher_view.encode_prompts(prompts + [""])  # the last one is the null text
        self.null_index = len(prompts)

    def _standardise_latents(self) -> None:
        """SD3's latent normalisation, measured on the data: shift_factor the mean of the posterior means, and
        scaling_factor one over the standard deviation of the shifted posterior samples (the VAE weights unchanged)."""
        mean, logvar = self.latent_params.chunk(2, dim=1)
        generator = torch.Generator().manual_seed(0)
        z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn(mean.shape, generator=generator)
        shift = mean.mean().item()
        self.vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / (z - shift).std().item())

    def updates(self) -> list[Update]:
        return [Update("unet", self.unet, self.loss, self.options.optimizer, ema_decay=self.options.ema_decay)]

    def loss(self, unet: torch.nn.Module) -> LossOutput:
        idx = torch.randint(0, self.latent_params.shape[0], (self.batch_size,))
        x0 = self.teacher_view.sample_latents(self.latent_params[idx])
        prompt = self.caption_index[idx].clone()
        prompt[torch.rand(self.batch_size) < self.options.label_dropout] = self.null_index
        condition = self.prompt_conditions[prompt].to(self.device)
        schedule = self.teacher_view.schedule
        net = functools.partial(unet_forward, unet, schedule=schedule)  # VP: the grid time itself
        return LossOutput(denoising_loss(net, schedule, x0, condition).mean())

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _to_device(self) -> None:
        """The frozen VAE and text encoder follow the UNet (accelerate moves only what it prepares)."""
        for part in (self.vae, self.text_encoder, self.teacher_view.text_encoder_2, self.teacher_view.text_encoder_3):
            if part is not None:
                part.to(self.device)

    def evaluate(self) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        self._to_device()
        return self.evaluator.teacher_metrics(self.teacher_view, steps=[self.options.eval_steps],
                                              guidance_scale=self.options.eval_guidance)

    @torch.no_grad()
    def sample_images(self) -> torch.Tensor:
        """`grid_prompts()` (a row per digit: four colours, then four uncoloured) after 25 guided DDIM steps."""
        from onestep.data.digits_t2i import grid_prompts
        from onestep.eval.quantize import to_uint8
        from onestep.sampling.teacher import sample_teacher

        self._to_device()
        prompts = grid_prompts()
        condition = self.teacher_view.condition(prompts=prompts)
        latents = sample_teacher(self.teacher_view, condition, len(prompts), 25,
                                 guidance_scale=self.options.eval_guidance,
                                 generator=torch.Generator(self.device).manual_seed(0))
        return to_uint8(self.teacher_view.decode(latents).clamp(-1, 1))

    def sample_labels(self) -> list[str]:
        from onestep.data.digits_t2i import grid_prompts

        return grid_prompts()

    def export_pipeline(self, out_dir: Path) -> None:
        """A stock StableDiffusionPipeline (no safety checker) or, for a flow teacher, StableDiffusion3Pipeline folder,
        the VAE and denoiser saved in `export_dtype`.

        The text encoders stay float32 (they are tiny): transformers loads a model in its saved dtype, diffusers in
        float32, so a float16 text encoder would hand a default-loaded float32 denoiser float16 embeddings."""
        from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

        from onestep.export.pipeline import export_pipeline

        dtype = getattr(torch, self.options.export_dtype)
        parts = dict(vae=copy.deepcopy(self.vae).to(dtype), text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                     scheduler=self.scheduler)
        if self.is_flow:
            view = self.teacher_view
            pipeline = StableDiffusion3Pipeline(
                transformer=copy.deepcopy(self.unet).to(dtype), text_encoder_2=view.text_encoder_2,
                tokenizer_2=view.tokenizer_2, text_encoder_3=view.text_encoder_3, tokenizer_3=view.tokenizer_3,
                **parts)
        else:
            pipeline = StableDiffusionPipeline(unet=copy.deepcopy(self.unet).to(dtype), safety_checker=None,
                                               feature_extractor=None, requires_safety_checker=False, **parts)
        export_pipeline(pipeline, out_dir)
