"""Training a latent text-to-image teacher from captioned images: SD's recipe in miniature (`method: teacher` with
captioned data, e.g. `data.name: digits_t2i`).

The UNet (UNet2DConditionModel) learns the denoising loss on posterior samples of a trained, frozen VAE, scaled by its
`scaling_factor`, cross-attending to the hidden states of a frozen CLIP text encoder; captions are replaced by the
empty prompt with probability `label_dropout` (the null text of classifier-free guidance).

The text encoder is random and frozen, not trained jointly. SD's is frozen too (pretrained CLIP); here nothing
pretrained is available, and a frozen random transformer still maps every distinct prompt to distinct hidden states,
which cross-attention learns to read. Frozen keeps the null-text embedding fixed through training, lets the prompt
embeddings be computed once, and keeps the distillers' view (a frozen encoder) the same as for SD.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from onestep.models.denoising import denoising_loss
from onestep.models.unet import unet_forward
from onestep.training.denoiser_task import DenoiserOptions
from onestep.training.updates import LossOutput, Update


def random_text_encoder(tokenizer, seed: int, **config) -> CLIPTextModel:
    """A CLIPTextModel of `config`, initialised from `seed` (without moving the global RNG), sized to `tokenizer`."""
    config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(config).eval().requires_grad_(False)


class TextDenoiserTraining:
    """x0 = scaling_factor * z, z ~ q(z | image); denoising loss conditioned on the caption's text embedding."""

    def __init__(self, options: DenoiserOptions, images: torch.Tensor, captions: list[str], batch_size: int,
                 tokenizer, evaluator=None):
        from onestep.models.loading import load_model
        from onestep.models.teacher import Teacher

        if options.vae is None or not options.text_encoder:
            raise ValueError("a text-to-image teacher needs options.vae (a trained VAE folder) and "
                             "options.text_encoder (CLIPTextConfig kwargs)")
        self.options, self.batch_size, self.evaluator = options, batch_size, evaluator
        self.vae: AutoencoderKL = load_model(Path(options.vae)).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_encoder = random_text_encoder(tokenizer, options.text_encoder_seed, **options.text_encoder)
        self.unet = UNet2DConditionModel(**options.unet)
        self.scheduler = DDPMScheduler(**options.scheduler)
        self.teacher_view = Teacher(self.unet, self.scheduler, vae=self.vae, text_encoder=self.text_encoder,
                                    tokenizer=tokenizer, frozen=False)
        with torch.no_grad():
            posterior = torch.cat([self.vae.encode(images[i:i + 512]).latent_dist.parameters
                                   for i in range(0, len(images), 512)])
        self.latent_params = posterior  # (N, 2C, h, w): mean and log-variance, a fresh z each step
        prompts = sorted(set(captions))
        self.caption_index = torch.as_tensor([prompts.index(c) for c in captions])
        self.prompt_conditions = self.teacher_view.encode_prompts(prompts + [""])  # the last one is the null text
        self.null_index = len(prompts)

    def updates(self) -> list[Update]:
        return [Update("unet", self.unet, self.loss, self.options.optimizer, ema_decay=self.options.ema_decay)]

    def loss(self, unet: torch.nn.Module) -> LossOutput:
        idx = torch.randint(0, self.latent_params.shape[0], (self.batch_size,))
        mean, logvar = self.latent_params[idx].chunk(2, dim=1)
        z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn_like(mean)
        x0 = (z * self.vae.config.scaling_factor).to(self.device)
        prompt = self.caption_index[idx].clone()
        prompt[torch.rand(self.batch_size) < self.options.label_dropout] = self.null_index
        condition = self.prompt_conditions[prompt].to(self.device)
        net = functools.partial(unet_forward, unet)
        return LossOutput(denoising_loss(net, self.teacher_view.schedule, x0, condition).mean())

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _to_device(self) -> None:
        """The frozen VAE and text encoder follow the UNet (accelerate moves only what it prepares)."""
        self.vae.to(self.device)
        self.text_encoder.to(self.device)

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
        """A stock StableDiffusionPipeline folder (no safety checker), the VAE and UNet saved in `export_dtype`.

        The text encoder stays float32 (it is tiny): transformers loads a model in its saved dtype, diffusers in
        float32, so a float16 text encoder would hand a default-loaded float32 UNet float16 embeddings."""
        from diffusers import StableDiffusionPipeline

        from onestep.export.pipeline import export_pipeline

        dtype = getattr(torch, self.options.export_dtype)
        pipeline = StableDiffusionPipeline(
            vae=copy.deepcopy(self.vae).to(dtype), text_encoder=self.text_encoder,
            tokenizer=self.tokenizer, unet=copy.deepcopy(self.unet).to(dtype), scheduler=self.scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        export_pipeline(pipeline, out_dir)
