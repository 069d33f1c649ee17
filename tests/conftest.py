"""Tiny random diffusers components (CPU, seconds) shared by the tests."""

from __future__ import annotations

import json
import string

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from onestep.teacher import Teacher


# Tiny models run fastest on one thread without oneDNN (its per-shape kernel builds dominate at this size),
# and a single thread does not fight a training job running beside the tests.
torch.set_num_threads(1)
torch.backends.mkldnn.enabled = False


def save_folder(out_dir, pipeline_class: str, **components) -> None:
    """A diffusers model folder (model_index.json + one subfolder per component) for loading tests."""
    import diffusers

    index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__}
    for name, component in components.items():
        component.save_pretrained(out_dir / name)
        index[name] = [type(component).__module__.split(".")[0], type(component).__name__]
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2))


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


def tiny_clip(tmp_path):
    """A 1-layer CLIP text encoder and a CLIP tokenizer over a hand-made vocabulary (letters, 'cat', 'dog')."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    for token in [c + "</w>" for c in string.ascii_lowercase] + ["ca", "cat</w>", "do", "dog</w>",
                                                                   "<|startoftext|>", "<|endoftext|>"]:
        vocab[token] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\nd o\ndo g</w>\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=8)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=8, bos_token_id=vocab["<|startoftext|>"],
                            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    return CLIPTextModel(config).eval(), tokenizer


@pytest.fixture
def class_teacher() -> Teacher:
    return Teacher(tiny_unet(num_classes=3), scheduler())


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
