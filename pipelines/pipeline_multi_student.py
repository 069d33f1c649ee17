"""Multi-Student Distillation (MSD): K one-step students, each serving its own slice of the conditions.

This file imports only torch and diffusers: every exported folder carries a copy of it and loads with plain
diffusers (`custom_pipeline="pipeline_multi_student", trust_remote_code=True`) where onestep is not installed. It
does not import `pipeline_onestep.py` either (each pipeline file must load alone), so it repeats the one-step
read-out of `OneStepPipeline` (same conventions: VP discrete time, x0 read out by `prediction_type` in float32,
images in [-1, 1] in model space, [0, 1] out; flow students: rectified flow on the scheduler's shifted training grid,
x0 = x_t - s_t v, prompts through StableDiffusion3Pipeline's / FluxPipeline's `encode_prompt`, as there) and
evaluates the router from its stored config; fitting and validating routers is `onestep.models.routing`'s job, and
the tests check both route identically.

Storing K students: one optional component slot per student, `unet_0` ... `unet_7` (`MAX_STUDENTS`), unused slots
saved as `[null, null]`. Each student is then a plain diffusers `UNet2DModel` / `UNet2DConditionModel` in its own
subfolder with its own config (students may differ in architecture), so all three loads work with diffusers'
standard machinery: `MultiStudentPipeline.from_pretrained(folder)`, plain `DiffusionPipeline.from_pretrained(folder,
custom_pipeline=..., trust_remote_code=True)`, and `UNet2DModel.from_pretrained(folder, subfolder="unet_k")`.
diffusers passes `from_pretrained` only the components named in `__init__`, so a variable K needs named slots; a
container `ModelMixin` holding an `nn.ModuleList` was rejected: its weights would live in one file (no per-student
`subfolder=` load), and diffusers resolves a non-diffusers component class either from a module the caller already
imported (absent without onestep) or from a `.py` file in the component folder, which every load, the onestep one
included, would then have to import as remote code.
"""

from __future__ import annotations

import inspect
import os
import shutil

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
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor


logger = logging.get_logger(__name__)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_STUDENTS = 8
STUDENT_SLOTS = tuple(f"unet_{k}" for k in range(MAX_STUDENTS))
Student = UNet2DModel | UNet2DConditionModel | SD3Transformer2DModel | FluxTransformer2DModel
FLOW_STUDENTS = (SD3Transformer2DModel, FluxTransformer2DModel)


def route_requests(router: dict, class_labels: torch.Tensor | None,
                   prompt_embeds: torch.Tensor | None) -> torch.LongTensor:
    """Student index per request from a stored router config (`onestep.models.routing.Router.to_config()`).

    The same arithmetic as `onestep.models.routing`: `class_range` k = label * K // num_classes; `class_mapping` a
    lookup table; `text_pca` bits (projection of the token-mean prompt embedding, in float64, > median) read as binary.
    """
    kind = router["type"]
    if kind in ("class_range", "class_mapping"):
        if class_labels is None:
            raise ValueError(f"a {kind} router routes by class label; call the pipeline with class labels")
        if kind == "class_range":
            return class_labels.long() * router["num_students"] // router["num_classes"]
        return torch.as_tensor(router["mapping"], dtype=torch.long, device=class_labels.device)[class_labels.long()]
    if kind == "text_pca":
        if prompt_embeds is None:
            raise ValueError("a text_pca router routes by prompt; call the pipeline with a prompt")
        pooled = prompt_embeds.double().mean(dim=1)
        mean, thresholds = (torch.tensor(router[k], dtype=torch.float64, device=pooled.device)
                            for k in ("mean", "thresholds"))
        components = torch.tensor(router["components"], dtype=torch.float64, device=pooled.device)
        above = ((pooled - mean) @ components.reshape(len(thresholds), len(mean)).T) > thresholds
        return (above.long() * 2 ** torch.arange(above.shape[1], device=pooled.device)).sum(dim=1)
    raise ValueError(f"unknown router type {kind!r}")


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


def router_num_classes(router: dict) -> int | None:
    """Classes a class router splits (None for a text router)."""
    if router["type"] == "class_mapping":
        return len(router["mapping"])
    return router.get("num_classes")


class MultiStudentPipeline(DiffusionPipeline):
    r"""Generate with K distilled students: the router sends each request to the one student trained on it.

    Every student runs `OneStepPipeline`'s recursion on its own requests only, batched; noise is drawn for the whole
    batch in request order, so a request gets exactly what a `OneStepPipeline` of its student gives for that noise,
    however the batch happens to split among the students.

    Args:
        scheduler ([`SchedulerMixin`]): a DDPM-family scheduler; supplies only `alphas_cumprod` and `prediction_type`.
        unet_0 ... unet_7 ([`UNet2DModel`] or [`UNet2DConditionModel`]): students 0..K-1 in the first K slots (use
            `from_students`); they may differ in architecture but share the output shape.
        vae ([`AutoencoderKL`], *optional*): decoder of latent students (`latents / scaling_factor` is decoded).
        text_encoder ([`~transformers.CLIPTextModel`], *optional*), tokenizer ([`~transformers.CLIPTokenizer`],
            *optional*): the teacher's text encoder for text-to-image students (last hidden state, padded to the
            tokenizer's max length).
        text_encoder_2 ([`~transformers.CLIPTextModelWithProjection`], *optional*), tokenizer_2 (*optional*): SDXL's
            second text encoder, as in `OneStepPipeline` (penultimate hidden states of both encoders, the pooled
            embedding and the time ids); the router pools the concatenated hidden states.
        timesteps (`list[int]`, defaults to `[999]`): the students' read-out timesteps, decreasing.
        num_classes (`int`, *optional*): real classes; read from `unet_0.config.num_class_embeds - 1` when not given.
        router (`dict`): the router's config (`onestep.models.routing.Router.to_config()`); required, the default only
            satisfies diffusers (a parameter without default would count as a component).
    """

    model_cpu_offload_seq = "->".join(("text_encoder", "text_encoder_2", "text_encoder_3", *STUDENT_SLOTS, "vae"))
    _optional_components = ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                            "tokenizer_3", *STUDENT_SLOTS]

    def __init__(self, scheduler: SchedulerMixin, unet_0: Student | None = None, unet_1: Student | None = None,
                 unet_2: Student | None = None, unet_3: Student | None = None, unet_4: Student | None = None,
                 unet_5: Student | None = None, unet_6: Student | None = None, unet_7: Student | None = None,
                 vae: AutoencoderKL | None = None, text_encoder=None, tokenizer=None,
                 timesteps: list[int] | tuple[int, ...] = (999,), num_classes: int | None = None,
                 router: dict | None = None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                 tokenizer_3=None, embedded_guidance: float | None = None):
        super().__init__()
        slots = dict(zip(STUDENT_SLOTS, (unet_0, unet_1, unet_2, unet_3, unet_4, unet_5, unet_6, unet_7),
                         strict=True))
        self.register_modules(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
                              tokenizer_3=tokenizer_3, **slots)
        if embedded_guidance is not None:  # FLUX.1-dev students: the guidance their transformers were trained at
            self.register_to_config(embedded_guidance=float(embedded_guidance))
        students = self.check_students(list(slots.values()), vae)
        if num_classes is None and getattr(students[0].config, "num_class_embeds", None):
            num_classes = students[0].config.num_class_embeds - 1
        self.check_router(router, len(students), num_classes)
        self.register_to_config(timesteps=self.check_timesteps(timesteps), num_classes=num_classes,
                                router=dict(router))
        self.image_processor = VaeImageProcessor(do_resize=False)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """diffusers' `save_pretrained`, plus this file beside `model_index.json`, so that the saved folder loads
        again with plain diffusers (`custom_pipeline="pipeline_multi_student", trust_remote_code=True`)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        source = inspect.getfile(type(self))
        shutil.copyfile(source, os.path.join(save_directory, os.path.basename(source)))

    @classmethod
    def from_students(cls, students: list[Student], scheduler: SchedulerMixin, router: dict,
                      **kwargs) -> MultiStudentPipeline:
        """The pipeline of `students` (student k in slot `unet_k`); `kwargs` as in `__init__`."""
        if not 1 <= len(students) <= MAX_STUDENTS:
            raise ValueError(f"need 1 to {MAX_STUDENTS} students, got {len(students)}")
        return cls(scheduler, **dict(zip(STUDENT_SLOTS, students, strict=False)), router=router, **kwargs)

    # --- students and router --------------------------------------------------------------------------------------
    @property
    def students(self) -> list[Student]:
        """Student UNets in index order (the filled slots)."""
        return [unet for unet in (getattr(self, name) for name in STUDENT_SLOTS) if unet is not None]

    @staticmethod
    def check_students(slots: list[Student | None], vae: AutoencoderKL | None = None) -> list[Student]:
        """The students, checked to fill the first K slots and to share one output shape (one VAE decodes all)."""
        students = [unet for unet in slots if unet is not None]
        if not students or any(unet is None for unet in slots[:len(students)]):
            raise ValueError(f"students must fill slots unet_0..unet_{{K-1}} without gaps, got "
                             f"{[name for name, unet in zip(STUDENT_SLOTS, slots, strict=True) if unet is not None]}")
        shapes = {sample_shape(unet, vae) for unet in students}
        if len(shapes) > 1:
            raise ValueError(f"students must share one sample shape (C, H, W), got {sorted(shapes)}")
        return students

    @staticmethod
    def check_router(router: dict | None, num_students: int, num_classes: int | None) -> None:
        """The router must route to exactly these students and, for class routers, split exactly these classes."""
        if router is None:
            raise ValueError("MultiStudentPipeline needs a router config (onestep.models.routing.Router.to_config())")
        if router.get("num_students") != num_students:
            raise ValueError(f"router is for {router.get('num_students')} students, the pipeline has {num_students}")
        routed = router_num_classes(router)
        if routed is not None and routed != num_classes:
            raise ValueError(f"router splits {routed} classes, the students have {num_classes}")

    def route(self, class_labels: torch.Tensor | None = None,
              prompt_embeds: torch.Tensor | None = None) -> torch.LongTensor:
        """Student index per request (class labels, or the text encoder's prompt embeddings)."""
        return route_requests(self.config.router, class_labels, prompt_embeds)

    # --- schedule -----------------------------------------------------------------------------------------------
    def check_timesteps(self, timesteps: list[int] | tuple[int, ...]) -> list[int]:
        """`timesteps` as a list of ints, checked to be strictly decreasing within [0, T)."""
        steps = [int(t) for t in timesteps]
        num_train = self.num_train_timesteps
        decreasing = all(a > b for a, b in zip(steps, steps[1:], strict=False))
        if not steps or not decreasing or any(not 0 <= t < num_train for t in steps):
            raise ValueError(f"timesteps must be strictly decreasing integers in [0, {num_train}), got {timesteps}")
        return steps

    @property
    def is_flow(self) -> bool:
        """Flow-matching transformer students (rectified flow; see the module docstring)."""
        return isinstance(self.unet_0, FLOW_STUDENTS)

    @property
    def num_train_timesteps(self) -> int:
        if self.is_flow:
            return self.scheduler.config.num_train_timesteps
        return len(self.scheduler.alphas_cumprod)

    def flow_sigma(self, t: int) -> torch.Tensor:
        """s_t (float64) of the scheduler's training grid: (t + 1) / T shifted as its pipeline shifts it (FLUX: at the
        students' own image sequence length)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # (imports the pipelines: only for flow)

        cfg = self.scheduler.config
        s = torch.tensor((t + 1) / cfg.num_train_timesteps, dtype=torch.float64)
        if cfg.get("use_dynamic_shifting"):
            _, h, w = self.sample_shape
            mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256),
                                 cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                 cfg.get("max_shift", 1.15))
            return self.scheduler.time_shift(mu, 1.0, s)
        return cfg.shift * s / (1 + (cfg.shift - 1) * s)

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

    # --- conditions -------------------------------------------------------------------------------------------------
    def prepare_class_labels(self, class_labels: list[int] | torch.Tensor | None,
                             batch_size: int) -> torch.Tensor | None:
        """Checked labels on the execution device; balanced over the classes when none are given."""
        num_classes = self.config.num_classes
        if num_classes is None:
            if class_labels is not None:
                raise ValueError("class_labels given to students that are not class-conditional")
            return None
        if class_labels is None:
            class_labels = torch.arange(batch_size) % num_classes
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class_labels must be non-empty ints in [0, {num_classes}), got {class_labels}")
        return labels.to(self._execution_device)

    @torch.no_grad()
    def encode_prompt(self, prompt: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt embeddings, pooled embeddings or None), as the teacher computed them in training (the
        arithmetic of `OneStepPipeline`'s `encode_text`: the last hidden state of one encoder; SDXL's two encoders'
        penultimate hidden states concatenated and the second's pooled embedding); flow students: the
        StableDiffusion3Pipeline's / FluxPipeline's own `encode_prompt`, T5 at the pipeline's default length (at most
        its tokenizer's)."""
        if self.is_flow:
            return self.encode_flow_prompt(prompt)
        encoders = [(encoder, tokenizer) for encoder, tokenizer in ((self.text_encoder, self.tokenizer),
                                                                    (self.text_encoder_2, self.tokenizer_2))
                    if encoder is not None]
        if not encoders or any(tokenizer is None for _, tokenizer in encoders):
            raise ValueError("prompt given to a pipeline without a text encoder and tokenizer")
        device = self._execution_device
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

    def encode_flow_prompt(self, prompt: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        flux = isinstance(self.unet_0, FluxTransformer2DModel)
        names = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"] + ([] if flux else
                                                                                  ["text_encoder_3", "tokenizer_3"])
        texts = {name: getattr(self, name) for name in names}
        t5 = texts["tokenizer_2" if flux else "tokenizer_3"]
        length = min(512 if flux else 256, t5.model_max_length if t5 is not None else 10**9)
        device = self._execution_device
        if flux:
            pipe = FluxPipeline(transformer=self.unet_0, scheduler=None, vae=None, **texts)
            return pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device, max_sequence_length=length)[:2]
        pipe = StableDiffusion3Pipeline(transformer=self.unet_0, scheduler=None, vae=None, image_encoder=None,
                                        feature_extractor=None, **texts)
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False, max_sequence_length=length)
        return embeds, pooled

    def time_ids(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """SDXL's default micro-conditioning for uncropped images of the students' resolution, (batch_size, 6)."""
        _, height, width = self.sample_shape
        factor = 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)
        height, width = height * factor, width * factor
        return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=device).expand(
            batch_size, 6)

    def unet_kwargs(self, unet: Student, class_labels: torch.Tensor | None,
                    prompt_embeds: torch.Tensor | None, pooled_prompt_embeds: torch.Tensor | None = None) -> dict:
        """Conditioning keywords of one student's call: class labels and/or prompt embeddings, and for SDXL-style
        students the pooled embeddings and time ids (`added_cond_kwargs`), in its dtype; a flow student its prompt
        and pooled embeddings and FLUX.1-dev's embedded guidance."""
        if isinstance(unet, FLOW_STUDENTS):
            if prompt_embeds is None or pooled_prompt_embeds is None:
                raise ValueError("flow students need a prompt (or prompt_embeds with pooled_prompt_embeds)")
            guidance = None
            if getattr(unet.config, "guidance_embeds", False):
                guidance = torch.full((len(prompt_embeds),), self.config.get("embedded_guidance", 3.5),
                                      device=prompt_embeds.device, dtype=torch.float32)
            return {"encoder_hidden_states": prompt_embeds.to(unet.dtype),
                    "pooled_projections": pooled_prompt_embeds.to(unet.dtype), "guidance": guidance}
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        if "encoder_hidden_states" in inspect.signature(unet.forward).parameters:
            cfg = unet.config
            cross_attends = any("CrossAttn" in (block or "") for block in (*cfg.down_block_types, cfg.mid_block_type))
            if cross_attends and prompt_embeds is None:
                raise ValueError(f"this UNet cross-attends to text; call {type(self).__name__} with a prompt")
            kwargs["encoder_hidden_states"] = None if prompt_embeds is None else prompt_embeds.to(unet.dtype)
        if getattr(unet.config, "addition_embed_type", None) == "text_time":
            if pooled_prompt_embeds is None:
                raise ValueError("this UNet takes SDXL's pooled text embedding: the pipeline needs text_encoder_2")
            time_ids = self.time_ids(len(pooled_prompt_embeds), pooled_prompt_embeds.device)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled_prompt_embeds.to(unet.dtype),
                                           "time_ids": time_ids.to(unet.dtype)}
        return kwargs

    # --- generation -----------------------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the students' output (latents for latent students)."""
        return sample_shape(self.unet_0, self.vae)

    def predict_x0(self, unet: Student, x_t: torch.Tensor, t: int, unet_kwargs: dict) -> torch.Tensor:
        """One student call at timestep t, read out as x0 in float32 (a flow student at s_t * T, as its pipeline)."""
        if isinstance(unet, FLOW_STUDENTS):
            time = (self.flow_sigma(t) * self.num_train_timesteps).float().to(x_t.device).expand(x_t.shape[0])
            return self.to_x0(flow_call(unet, x_t, time, **unet_kwargs), x_t, t)
        timestep = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        out = unet(x_t.to(unet.dtype), timestep, **unet_kwargs, return_dict=False)[0]
        return self.to_x0(out, x_t, t)

    def student_x0(self, unet: Student, noises: list[torch.Tensor], unet_kwargs: dict) -> torch.Tensor:
        """`OneStepPipeline`'s recursion for one student, given the noise of each read-out step."""
        timesteps = self.config.timesteps
        x = self.alpha_sigma(timesteps[0])[1].to(noises[0].device) * noises[0]
        x0 = self.predict_x0(unet, x, timesteps[0], unet_kwargs)
        for t, noise in zip(timesteps[1:], noises[1:], strict=True):
            alpha, sigma = (v.to(noise.device) for v in self.alpha_sigma(t))
            x = alpha * x0 + sigma * noise
            x0 = self.predict_x0(unet, x, t, unet_kwargs)
        return x0

    def generate(self, students: torch.Tensor, class_labels: torch.Tensor | None, prompt_embeds: torch.Tensor | None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None,
                 latents: torch.Tensor | None = None) -> torch.Tensor:
        """x0 in model space (float32), request by request, each from its routed student.

        All noise is drawn first over the whole batch, in request order and in `OneStepPipeline`'s draw order (one
        draw per read-out step; `latents`, when given, is the first), so a sample does not depend on how the batch
        splits among the students.
        """
        device = self._execution_device
        shape = (students.numel(), *self.sample_shape)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        first = [] if latents is None else [latents.to(device, torch.float32)]
        noises = first + [randn_tensor(shape, generator, device, torch.float32)
                          for _ in self.config.timesteps[len(first):]]
        x0 = torch.empty(shape, device=device, dtype=torch.float32)
        for k, unet in enumerate(self.students):
            rows = (students == k).nonzero().flatten()
            if rows.numel() == 0:
                continue
            kwargs = self.unet_kwargs(unet, take(class_labels, rows), take(prompt_embeds, rows),
                                      take(pooled_prompt_embeds, rows))
            x0[rows] = self.student_x0(unet, [noise[rows] for noise in noises], kwargs)
        return x0

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (unclamped) from model-space samples: the VAE decodes latents when there is one."""
        if self.vae is None:
            return x0
        latents = x0 / self.vae.config.scaling_factor + (getattr(self.vae.config, "shift_factor", None) or 0.0)
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0].float()

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels: list[int] | torch.Tensor | None = None,
                 prompt: str | list[str] | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True, num_images_per_prompt: int = 1, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None) -> ImagePipelineOutput | tuple:
        r"""Generate images, each by the student its condition is routed to.

        Args:
            batch_size (`int`, defaults to 1): number of images when no `class_labels` are given.
            class_labels (`list[int]` or `torch.Tensor`, *optional*): one class per image (class-conditional
                students); defaults to `batch_size` labels cycling over all classes.
            prompt (`str` or `list[str]`, *optional*): text-to-image students; one image per prompt (a single
                string is repeated `batch_size` times).
            generator (`torch.Generator`, *optional*): makes generation deterministic.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (NHWC in [0, 1]), `"pt"` (NCHW in [0, 1]) or
                `"latent"` (the students' float32 output in model space, before any VAE decoding).
            return_dict (`bool`, defaults to `True`): return an [`ImagePipelineOutput`] rather than a tuple.
            num_images_per_prompt (`int`, defaults to 1): images per prompt, prompt embedding or class label.
            latents (`torch.Tensor`, *optional*): the standard-normal noise z of the first read-out step,
                (images, C, H, W) in model space; drawn with `generator` when not given.
            prompt_embeds (`torch.Tensor`, *optional*), pooled_prompt_embeds (`torch.Tensor`, *optional*):
                precomputed text embeddings (and SDXL's pooled ones) instead of `prompt`; routed like a prompt's.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give prompt or prompt_embeds, not both")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        labels = self.prepare_class_labels(class_labels, batch_size)
        if prompt is not None:
            prompt_embeds, pooled_prompt_embeds = self.encode_prompt(
                [prompt] * batch_size if isinstance(prompt, str) else list(prompt))
        labels, prompt_embeds, pooled_prompt_embeds = (
            None if v is None else v.to(self._execution_device).repeat_interleave(num_images_per_prompt, dim=0)
            for v in (labels, prompt_embeds, pooled_prompt_embeds))
        students = self.route(labels, prompt_embeds)
        x0 = self.generate(students, labels, prompt_embeds, generator, pooled_prompt_embeds, latents)
        images = x0 if output_type == "latent" else self.image_processor.postprocess(self.decode(x0), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def sample_shape(unet: Student, vae: AutoencoderKL | None = None) -> tuple[int, int, int]:
    """(C, H, W) a UNet generates (FLUX: unpacked latents at the VAE's sample size)."""
    cfg = unet.config
    if isinstance(unet, FluxTransformer2DModel):
        size = vae.config.sample_size if isinstance(vae.config.sample_size, int) else vae.config.sample_size[0]
        size //= 2 ** (len(vae.config.block_out_channels) - 1)
        return cfg.in_channels // 4, size, size
    size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
    return cfg.in_channels, size[0], size[1]


def take(values: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """The rows of a per-request tensor (None stays None)."""
    return None if values is None else values[rows]


def flow_call(transformer: Student, x_t: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
              pooled_projections: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
    """A flow transformer's velocity at (B, C, H, W) latents, called as its pipeline calls it (FLUX: packed 2x2 with
    image ids and zero text ids, timestep / 1000)."""
    dtype = transformer.dtype
    if not isinstance(transformer, FluxTransformer2DModel):
        return transformer(hidden_states=x_t.to(dtype), timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                           pooled_projections=pooled_projections, return_dict=False)[0]
    from diffusers import FluxPipeline

    b, c, h, w = x_t.shape
    out = transformer(hidden_states=FluxPipeline._pack_latents(x_t.to(dtype), b, c, h, w),
                      timestep=timestep.to(dtype) / 1000, guidance=guidance, pooled_projections=pooled_projections,
                      encoder_hidden_states=encoder_hidden_states,
                      txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=x_t.device, dtype=dtype),
                      img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, dtype),
                      return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h, w, 1)
