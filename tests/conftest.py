"""Tiny random diffusers components (CPU, seconds) shared by the tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from onestep.models import tiny_folders
from onestep.models.teacher import Teacher
from onestep.models.tiny_folders import save_folder


# Tiny models run fastest on one thread without oneDNN (its per-shape kernel builds dominate at this size),
# and a single thread does not fight a training job running beside the tests.
torch.set_num_threads(1)
torch.backends.mkldnn.enabled = False

# DMD's (and t2i SiD's) regression pairs in a test run: 4 pairs of 2 teacher steps instead of 1,000 of 50
TINY_PAIRS = ["options.regression.num_pairs=4", "options.regression.teacher_steps=2"]


def tiny_unet(num_classes: int | None = 3, channels: int = 1, size: int = 8, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
                       num_class_embeds=None if num_classes is None else num_classes + 1)


def tiny_text_unet(cross_dim: int = 16, channels: int = 4, size: int = 8, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=size, in_channels=channels, out_channels=channels,
                                block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=cross_dim, attention_head_dim=4)


def tiny_vae(latent_channels: int = 4, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                         norm_num_groups=4, layers_per_block=1, sample_size=16)


def scheduler(prediction_type: str = "v_prediction", zero_snr: bool = True) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", rescale_betas_zero_snr=zero_snr,
                         prediction_type=prediction_type, timestep_spacing="trailing", clip_sample=False)


def tiny_clip(tmp_path, projection_dim: int | None = None, seed: int = 0):
    """A 1-layer CLIP text encoder and a CLIP tokenizer over a hand-made vocabulary (letters, 'cat', 'dog'); with
    `projection_dim` a `CLIPTextModelWithProjection` (SDXL's second encoder, giving a pooled embedding)."""
    return tiny_folders.tiny_clip(tmp_path, projection_dim, seed)


def tiny_sdxl_unet(cross_dim: int = 32, pooled_dim: int = 8, time_dim: int = 8, seed: int = 0) -> UNet2DConditionModel:
    """An SDXL-shaped UNet: cross-attention to both encoders' states, and the "text_time" added embedding of the
    pooled text embedding and 6 time ids."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_dim,
                                attention_head_dim=4, addition_embed_type="text_time",
                                addition_time_embed_dim=time_dim,
                                projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim)


def sd_folder(out_dir: Path, kind: str = "sd15") -> Path:
    """A tiny Stable Diffusion-shaped teacher folder written with `save_pretrained`: "sd15" (epsilon, PNDM, one
    CLIP encoder), "sd2" (v-prediction, DDIM) or "sdxl" (two encoders, the second with projection, Euler,
    force_zeros_for_empty_prompt as in SDXL base)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    sd = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
    (out_dir / "vocab").mkdir(parents=True)
    encoder, tokenizer = tiny_clip(out_dir / "vocab")
    if kind == "sdxl":
        encoder_2, tokenizer_2 = tiny_clip(out_dir / "vocab", projection_dim=8, seed=1)
        save_folder(out_dir, "StableDiffusionXLPipeline", {"force_zeros_for_empty_prompt": True},
                    unet=tiny_sdxl_unet(), vae=tiny_vae(), text_encoder=encoder, tokenizer=tokenizer,
                    text_encoder_2=encoder_2, tokenizer_2=tokenizer_2,
                    scheduler=EulerDiscreteScheduler(**sd, timestep_spacing="leading", steps_offset=1))
    else:
        sched = (PNDMScheduler(**sd, skip_prk_steps=True, steps_offset=1) if kind == "sd15"
                 else DDIMScheduler(**sd, prediction_type="v_prediction", clip_sample=False, steps_offset=1))
        save_folder(out_dir, "StableDiffusionPipeline", unet=tiny_text_unet(), vae=tiny_vae(), text_encoder=encoder,
                    tokenizer=tokenizer, scheduler=sched)
    shutil.rmtree(out_dir / "vocab")
    return out_dir


def bench_run(run: Path) -> Path:
    """A finished run folder of builtin:digits for `onestep bench`: the copied teacher exported as a one-step sid
    student, with a one-point history."""
    from onestep.export.pipeline import export_generator
    from onestep.models.generator import Generator

    teacher = Teacher.from_pretrained("builtin:digits")
    export_generator(Generator.from_teacher(teacher.unet, teacher.schedule, [400]), teacher, run / "pipeline")
    (run / "config.json").write_text(json.dumps({"method": "sid", "teacher": {"path": "builtin:digits",
                                                                              "guidance_scale": 1.0}}))
    history = [{"step": 10, "elapsed_s": 6.0, "fd_digits/student": 50.0}]
    (run / "metrics.json").write_text(json.dumps({"step": 10, "train_seconds": 6.0, "history": history}))
    return run


def hub_snapshot(cache_dir: Path, repo_id: str, folder: Path, commit: str = "0" * 40, ref: str = "main") -> Path:
    """`folder` laid out in a Hugging Face hub cache as `huggingface_hub` leaves a downloaded model
    (models--owner--name/snapshots/COMMIT/..., refs/REF naming the commit)."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    return snapshot


@pytest.fixture
def class_teacher() -> Teacher:
    return Teacher(tiny_unet(num_classes=3), scheduler())


@pytest.fixture(scope="session")
def _sd_folders(tmp_path_factory) -> dict[str, Path]:
    """Each tiny SD-shaped folder written once per session (the fixtures below hand out copies)."""
    root = tmp_path_factory.mktemp("sd_folders")
    return {kind: sd_folder(root / kind, kind) for kind in ("sd15", "sdxl")}


@pytest.fixture
def sd15_folder(tmp_path, _sd_folders) -> Path:
    """A tiny SD1.5-shaped teacher folder of this test's own (free to modify)."""
    return Path(shutil.copytree(_sd_folders["sd15"], tmp_path / "sd15"))


@pytest.fixture
def sdxl_folder(tmp_path, _sd_folders) -> Path:
    """A tiny SDXL-shaped teacher folder of this test's own (free to modify)."""
    return Path(shutil.copytree(_sd_folders["sdxl"], tmp_path / "sdxl"))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty, offline Hugging Face hub cache for this test (HF_HUB_CACHE; fill it with `hub_snapshot`)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once at import; the env is for subprocesses
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def text_teacher(tmp_path) -> Teacher:
    encoder, tokenizer = tiny_clip(tmp_path)
    return Teacher(tiny_text_unet(), scheduler("epsilon", zero_snr=False), vae=tiny_vae(), text_encoder=encoder,
                   tokenizer=tokenizer)


@pytest.fixture(autouse=True, scope="session")
def _stats_cache(tmp_path_factory):
    """Reference statistics cached by the tests go to a temporary folder, not the user's ~/.cache."""
    import os

    os.environ["ONESTEP_CACHE"] = str(tmp_path_factory.mktemp("onestep_cache"))


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """Each test starts without an AcceleratorState: accelerate keeps one per process, and a run that asks for
    other settings (bf16 after fp32) would otherwise be refused by the state an earlier test left."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def teacher_input_grads(unet, run) -> list[torch.Tensor | None]:
    """The gradient reaching each call's input x_t *through `unet` alone* while `run()` computes a loss and calls
    backward: one entry per call, None where the input carries no gradient (the teacher ran without one)."""
    grads: list[torch.Tensor | None] = []

    def pre_hook(module, args, kwargs):
        x = args[0]
        if not x.requires_grad:
            grads.append(None)
            return None
        slot = len(grads)
        grads.append(torch.zeros_like(x))
        own = x.view_as(x)  # a node of the teacher's own: its gradient excludes the other networks' paths
        own.register_hook(lambda g: grads.__setitem__(slot, g))
        return (own, *args[1:]), kwargs

    handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return grads


def train_steps_keep_teacher(distiller, out_dir, steps: int = 1) -> None:
    """Run `steps` Trainer steps of every update: the teacher's weights stay bit-identical while the trained
    networks (generator, critics) move."""
    from onestep.training.trainer import Trainer, TrainerConfig

    def snapshot(module):
        return {k: v.clone() for k, v in module.state_dict().items()}

    teacher = snapshot(distiller.teacher.unet)
    trained = {u.name: (u.module, snapshot(u.module)) for u in distiller.updates()}
    Trainer(distiller, out_dir, TrainerConfig(max_steps=steps, checkpoint_every=0, log_every=1)).train()
    assert all(torch.equal(v, teacher[k]) for k, v in distiller.teacher.unet.state_dict().items())
    for name, (module, before) in trained.items():
        assert any(not torch.equal(v, before[k]) for k, v in module.state_dict().items()), f"{name} did not train"


def critic_timesteps(distiller) -> torch.Tensor:
    """The timesteps of the fake score's one call in a critic loss (its denoising loss)."""
    seen = []
    forward = distiller.fake.forward

    def spy(x_t, t, condition, output="x0"):
        seen.append(t.clone())
        return forward(x_t, t, condition, output)

    distiller.fake.forward = spy
    distiller.critic_loss(distiller.fake)
    distiller.fake.forward = forward
    (t,) = seen
    return t


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory) -> Path:
    """A tiny StableDiffusion3Pipeline folder (CLIP-L, CLIP-G, T5), built once per session; do not modify it."""
    from onestep.models.tiny_folders import tiny_sd3_folder

    return tiny_sd3_folder(tmp_path_factory.mktemp("sd3") / "teacher")


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory) -> Path:
    """A tiny FluxPipeline folder with FLUX.1-dev's embedded guidance, built once per session; do not modify it."""
    from onestep.models.tiny_folders import tiny_flux_folder

    return tiny_flux_folder(tmp_path_factory.mktemp("flux") / "teacher")
