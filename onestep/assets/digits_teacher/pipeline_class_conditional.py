"""Multi-step sampler of a class-conditional diffusion UNet with classifier-free guidance, as a diffusers pipeline.

This file imports only torch and diffusers: teacher folders carry a copy of it and load with plain diffusers
(`custom_pipeline=..., trust_remote_code=True`) where onestep is not installed.

The class index `num_classes` (the UNet's last class embedding) is the null class used for guidance.
"""

from __future__ import annotations

import inspect
import os
import shutil

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DConditionModel, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor


OUTPUT_TYPES = ("pil", "np", "pt")


class ClassConditionalDiffusionPipeline(DiffusionPipeline):
    r"""Sample a (class-conditional) pixel-space diffusion UNet with its scheduler's step loop (DDIM, DDPM, ...).

    Guidance combines the conditional and null-class passes as x̂ = x̂_u + s (x̂_c − x̂_u) on the network output;
    the x0 read-out is affine in the output with the same coefficients for both passes, so this is the same
    combination on x0. s = 1 runs the conditional pass only.

    Args:
        unet ([`UNet2DModel`]): the denoiser; class-conditional when it has `num_class_embeds` (= classes + 1).
        scheduler ([`SchedulerMixin`]): a diffusers scheduler (its config sets spacing, clipping, prediction type).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel | UNet2DConditionModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(do_resize=False)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """diffusers' `save_pretrained`, plus this file beside `model_index.json`, so that the saved folder loads
        again with plain diffusers (`custom_pipeline="pipeline_class_conditional", trust_remote_code=True`)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        source = inspect.getfile(type(self))
        shutil.copyfile(source, os.path.join(save_directory, os.path.basename(source)))

    @property
    def num_classes(self) -> int | None:
        """Real classes (the null class is index `num_classes`), or None for an unconditional UNet."""
        num_embeds = getattr(self.unet.config, "num_class_embeds", None)
        return num_embeds - 1 if num_embeds else None

    def prepare_class_labels(self, class_labels: list[int] | torch.Tensor | None,
                             batch_size: int) -> torch.Tensor | None:
        """Checked labels on the execution device; balanced over the classes when none are given."""
        num_classes = self.num_classes
        if num_classes is None:
            if class_labels is not None:
                raise ValueError("class_labels given to a UNet that is not class-conditional")
            return None
        if class_labels is None:
            class_labels = torch.arange(batch_size) % num_classes
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class_labels must be non-empty ints in [0, {num_classes}), got {class_labels}")
        return labels.to(self._execution_device)

    def unet_output(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """The raw UNet output in float32."""
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        if "encoder_hidden_states" in inspect.signature(self.unet.forward).parameters:
            cfg = self.unet.config
            if any("CrossAttn" in (block or "") for block in (*cfg.down_block_types, cfg.mid_block_type)):
                raise ValueError(f"this UNet cross-attends to text; {type(self).__name__} runs it without text")
            kwargs["encoder_hidden_states"] = None  # a UNet2DConditionModel without cross-attention
        return self.unet(x_t.to(self.unet.dtype), t, **kwargs, return_dict=False)[0].float()

    def guided_output(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None,
                      guidance_scale: float) -> torch.Tensor:
        """Network output with classifier-free guidance; both passes run as one batch."""
        if class_labels is None or guidance_scale == 1.0:
            return self.unet_output(x_t, t, class_labels)
        null = torch.full_like(class_labels, self.num_classes)
        cond, uncond = self.unet_output(torch.cat([x_t, x_t]), t, torch.cat([class_labels, null])).chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels: list[int] | torch.Tensor | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 1.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            batch_size (`int`, defaults to 1): number of images when no `class_labels` are given.
            class_labels (`list[int]` or `torch.Tensor`, *optional*): one class per image; defaults to `batch_size`
                labels cycling over all classes.
            num_inference_steps (`int`, defaults to 50): scheduler steps.
            guidance_scale (`float`, defaults to 1.0): classifier-free guidance scale s (1 = no guidance).
            generator (`torch.Generator`, *optional*): makes generation deterministic.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (NHWC in [0, 1]) or `"pt"` (NCHW in [0, 1]).
            return_dict (`bool`, defaults to `True`): return an [`ImagePipelineOutput`] rather than a tuple.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        labels = self.prepare_class_labels(class_labels, batch_size)
        if labels is None and guidance_scale != 1.0:
            raise ValueError("guidance_scale != 1 needs a class-conditional UNet")
        num_images = batch_size if labels is None else labels.numel()
        device = self._execution_device
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
        shape = (num_images, cfg.in_channels, size[0], size[1])
        x = randn_tensor(shape, generator, device, torch.float32) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            out = self.guided_output(self.scheduler.scale_model_input(x, t), t, labels, guidance_scale)
            x = self.scheduler.step(out, t, x, generator=generator, return_dict=False)[0]
        images = self.image_processor.postprocess(x, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
