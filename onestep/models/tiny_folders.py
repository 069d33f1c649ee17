"""Tiny random diffusers folders built offline (no Hub): CLIP / T5 encoders with locally built tokenizers, and
SD3- and FLUX-shaped teacher folders whose every component is a few kilobytes. Tests and `onestep tiny` use them.

    tiny_sd3_folder(out_dir, t5=True)          a StableDiffusion3Pipeline folder (CLIP-L, CLIP-G, optional T5)
    tiny_flux_folder(out_dir, guidance=True)   a FluxPipeline folder (CLIP, T5; FLUX.1-dev's embedded guidance or
                                               schnell's none)
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import torch


def save_folder(out_dir: Path, pipeline_class: str, index_config: dict | None = None, **components) -> None:
    """A diffusers model folder (model_index.json + one subfolder per component written by `save_pretrained`);
    `index_config` adds pipeline config keys to model_index.json (e.g. force_zeros_for_empty_prompt)."""
    import diffusers

    index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__, **(index_config or {})}
    for name, component in components.items():
        if component is None:
            index[name] = [None, None]
            continue
        component.save_pretrained(out_dir / name)
        index[name] = [type(component).__module__.split(".")[0], type(component).__name__]
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2))


def tiny_clip(vocab_dir: Path, projection_dim: int | None = None, seed: int = 0, hidden_size: int = 16):
    """A 1-layer CLIP text encoder and a CLIP tokenizer (max length 8) over a hand-made vocabulary (letters, 'cat',
    'dog') written into `vocab_dir`; with `projection_dim` a `CLIPTextModelWithProjection` (a pooled embedding)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab_dir.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    for token in [c + "</w>" for c in string.ascii_lowercase] + ["ca", "cat</w>", "do", "dog</w>",
                                                                   "<|startoftext|>", "<|endoftext|>"]:
        vocab[token] = len(vocab)
    (vocab_dir / "vocab.json").write_text(json.dumps(vocab))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\nd o\ndo g</w>\n")
    tokenizer = CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"), model_max_length=8)
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"], projection_dim=projection_dim or hidden_size)
    model_cls = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return model_cls(config).eval(), tokenizer


def t5_tokenizer(max_length: int = 16, words: tuple[str, ...] = ("cat", "dog")):
    """A T5 tokenizer over letters and whole `words` (a Unigram model built with `tokenizers`, ids 0-2 pad, eos,
    unk as T5's); `max_length` its model_max_length."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0), (",", -1.0)]
    pieces += [("▁" + word, -0.5) for word in words] + [(c, -1.0) for c in string.ascii_lowercase]
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def tiny_t5(d_model: int = 32, seed: int = 0, max_length: int = 16, words: tuple[str, ...] = ("cat", "dog")):
    """A 1-layer T5 encoder and its `t5_tokenizer`."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_tokenizer(max_length, words)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval(), tokenizer


def tiny_flow_vae(latent_channels: int = 4, shift_factor: float = 0.1, scaling_factor: float = 0.5, seed: int = 0):
    """A 2-block AutoencoderKL (16-pixel images, 8x8 latents) with SD3/FLUX's latent shift and scale."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                         norm_num_groups=4, layers_per_block=1, sample_size=16, shift_factor=shift_factor,
                         scaling_factor=scaling_factor, use_quant_conv=False, use_post_quant_conv=False)


def tiny_sd3_transformer(seed: int = 0, num_layers: int = 2):
    """An SD3-shaped transformer: 8x8 latents of 4 channels in 2x2 patches, CLIP-L (8) + CLIP-G (16) pooled = 24,
    joint attention over 32-wide text states (T5's width)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                 caption_projection_dim=16, pooled_projection_dim=24, pos_embed_max_size=8)


def tiny_flux_transformer(guidance: bool = True, seed: int = 0):
    """A FLUX-shaped transformer: 4-channel latents packed 2x2 (16 inputs), one double and one single block,
    CLIP pooled 16, T5 states 32 wide; `guidance` is FLUX.1-dev's embedded guidance (schnell has none)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=16, guidance_embeds=guidance, axes_dims_rope=(4, 2, 2))


def tiny_sd3_folder(out_dir: str | Path, t5: bool = True, shift: float = 3.0) -> Path:
    """A tiny `StableDiffusion3Pipeline` folder: SD3 transformer, FlowMatchEulerDiscreteScheduler (static `shift`),
    VAE with shift and scaling factors, CLIP-L and CLIP-G (both projecting), and T5 unless `t5=False`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    out_dir = Path(out_dir)
    vocab = out_dir / "vocab"
    clip_l, tok_l = tiny_clip(vocab, projection_dim=8, hidden_size=8, seed=1)
    clip_g, tok_g = tiny_clip(vocab, projection_dim=16, hidden_size=16, seed=2)
    t5_model, t5_tok = tiny_t5(seed=3) if t5 else (None, None)
    save_folder(out_dir, "StableDiffusion3Pipeline", transformer=tiny_sd3_transformer(),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=tiny_flow_vae(shift_factor=0.0609,
                                                                                             scaling_factor=1.5305),
                text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=clip_g, tokenizer_2=tok_g,
                text_encoder_3=t5_model, tokenizer_3=t5_tok, image_encoder=None, feature_extractor=None)
    shutil.rmtree(vocab)
    return out_dir


def tiny_flux_folder(out_dir: str | Path, guidance: bool = True) -> Path:
    """A tiny `FluxPipeline` folder: FLUX transformer (`guidance`: FLUX.1-dev's embedded guidance; False: schnell),
    FlowMatchEulerDiscreteScheduler with dynamic shifting, VAE with shift and scaling factors, CLIP and T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    out_dir = Path(out_dir)
    vocab = out_dir / "vocab"
    clip, tok = tiny_clip(vocab, seed=1)
    t5_model, t5_tok = tiny_t5(seed=2)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    save_folder(out_dir, "FluxPipeline", transformer=tiny_flux_transformer(guidance), scheduler=scheduler,
                vae=tiny_flow_vae(shift_factor=0.1159, scaling_factor=0.3611), text_encoder=clip, tokenizer=tok,
                text_encoder_2=t5_model, tokenizer_2=t5_tok, image_encoder=None, feature_extractor=None)
    shutil.rmtree(vocab)
    return out_dir
