"""LoRA students and critics (peft): low-rank adapters train on a frozen teacher copy instead of all of its weights.

The adapters are injected into the UNet in place (`peft.inject_adapter_in_model`), so the network keeps its class,
config and call signature; only its parameter names change (`to_q.weight` -> `to_q.base_layer.weight`,
`to_q.lora_A.default.weight`, ...). That is why they are added last, once the network holds its starting weights.
The B matrices start at zero: a LoRA generator starts as exactly the network it adapts.

Exported two ways (`lora.export`): `merge` folds the adapters into the weights and writes a standard pipeline;
`adapter` writes the pipeline with the *base* UNet plus `pytorch_lora_weights.safetensors` in diffusers' LoRA format
(peft key names under the `unet.` prefix, the LoRA settings in the file's metadata). A `UNet2DConditionModel` loads
it with plain diffusers, `pipe.unet.load_lora_adapter(folder, prefix="unet")`; any UNet loads it with
`load_lora_weights` below (peft), e.g. the class-conditional `UNet2DModel`, which has no diffusers LoRA loader.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from onestep.errors import UserInputError


# DMD2's SDXL LoRA targets (tianweiy/DMD2): attention projections, feed-forwards, the ResNet convolutions and time
# projections, up/down-sampling convolutions; then the flow transformers' (SD3's, FLUX's joint-attention text stream
# and context feed-forward, FLUX's single-block MLP, as diffusers' train_dreambooth_lora_sd3/flux scripts adapt
# them); names a network does not have are simply not found.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                   "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
                   "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context.net.0.proj",
                   "ff_context.net.2", "proj_mlp")
EXPORTS = ("merge", "adapter")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name, so its loaders find the file by default


@dataclass
class LoRAConfig:
    """`options.lora` of every distiller: rank 0 (the default) trains every weight, as before."""

    rank: int = 0  # adapter rank (0: no LoRA, train every weight)
    alpha: float | None = None  # adapters scale by alpha / rank; None: alpha = rank (scale 1)
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # layers adapted
    dropout: float = 0.0  # dropout on the adapters' input
    critic: bool = False  # the critics' UNets train adapters too (a GAN head, being new, always trains fully)
    export: str = "merge"  # merge: adapters folded into a standard pipeline | adapter: base UNet + LoRA file
    # the adapted networks' frozen base weights ARE the teacher's (its dtype, no copy) instead of float32 copies; off
    # for FSDP (it would shard the teacher's weights) and for an offloaded teacher (they must stay on the GPU)
    share_base: bool = True

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def validate(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.export not in EXPORTS:
            raise ValueError(f"lora.export must be one of {', '.join(EXPORTS)}, got {self.export!r}")
        if self.enabled and not self.target_modules:
            raise ValueError("lora.target_modules is empty")

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha or self.rank, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules))


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UserInputError("LoRA needs peft: pip install 'onestep[lora]'") from None


def add_lora(unet: nn.Module, config: LoRAConfig) -> None:
    """Inject adapters into `unet` in place: afterwards only they require gradients, the base weights are frozen.

    The adapters train in float32 whatever the base's dtype (peft would create them in a half-precision base's)."""
    _require_peft()
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(config.peft_config(), unet)
    except ValueError as err:  # peft: none of the target modules exists in this network
        raise ValueError(f"lora.target_modules: {err}") from None
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def lora_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs of `unet` that carry adapters (none for a network without LoRA)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [(name, m) for name, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]


def without_adapters(unet: nn.Module, merge: bool) -> nn.Module:
    """A plain copy of a LoRA network, with the adapters folded into its weights (`merge`) or dropped (the base)."""
    plain = copy.deepcopy(unet)
    for name, layer in lora_layers(plain):
        if merge:
            layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, layer.get_base_layer())
    return plain


def save_lora_weights(unet: nn.Module, folder: Path) -> None:
    """`folder/pytorch_lora_weights.safetensors`: the adapters of `unet` in diffusers' LoRA format, with the peft
    settings (rank, alpha, targets) in the file's metadata so that a loader rebuilds the same adapters."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import get_peft_model_state_dict

    settings = next(iter(unet.peft_config.values())).to_dict()
    settings = {k: sorted(v) if isinstance(v, set) else v for k, v in settings.items()}
    settings["peft_type"] = str(settings["peft_type"].value)
    StableDiffusionLoraLoaderMixin.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                                     weight_name=LORA_WEIGHTS, unet_lora_adapter_metadata=settings)


def merged_folder_adapter(unet: nn.Module, folder: Path) -> nn.Module:
    """The generator an exported folder holds: its UNet, with the folder's LoRA file merged in when it has one
    (`lora.export: adapter`), so that sampling, FD and a next stage's `init_generator` see the trained generator."""
    if not (folder / LORA_WEIGHTS).is_file():
        return unet
    load_lora_weights(unet, folder)
    return without_adapters(unet, merge=True)


def load_lora_weights(unet: nn.Module, folder: Path) -> None:
    """Inject and load the adapters that `save_lora_weights` wrote into `unet` (the exported base UNet)."""
    _require_peft()
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    state, _, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(str(folder), weight_name=LORA_WEIGHTS,
                                                                         return_lora_metadata=True)
    prefix = StableDiffusionLoraLoaderMixin.unet_name + "."
    settings = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
    inject_adapter_in_model(LoraConfig(**settings), unet)
    set_peft_model_state_dict(unet, {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})


KOHYA_WEIGHTS = "lora_kohya.safetensors"  # not `*pytorch_lora_weights.safetensors`: diffusers' default stays the above


def save_kohya_lora(folder: Path, out_file: Path) -> None:
    """The adapters of `folder/pytorch_lora_weights.safetensors` in kohya's layout, the LoRA format of ComfyUI, A1111
    and kohya's sd-scripts: `lora_unet_<module path with _>.lora_down.weight` / `.lora_up.weight` and each module's
    `.alpha` (scale alpha / rank), converted by diffusers' `convert_state_dict_to_kohya` (which writes alpha = rank;
    set here to the adapters' own alpha). diffusers' `load_lora_weights` reads it back through its kohya converter."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    state, _, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(str(folder), weight_name=LORA_WEIGHTS,
                                                                         return_lora_metadata=True)
    prefix = StableDiffusionLoraLoaderMixin.unet_name + "."
    settings = {k.removeprefix(prefix): v for k, v in (metadata or {}).items() if k.startswith(prefix)}
    if settings.get("rank_pattern") or settings.get("alpha_pattern"):
        raise ValueError("per-module LoRA ranks or alphas have no single kohya alpha")
    kohya = convert_state_dict_to_kohya(state)
    alpha = torch.tensor(float(settings.get("lora_alpha") or settings["r"]))
    kohya = {k: alpha.clone() if k.endswith(".alpha") else v.contiguous() for k, v in kohya.items()}
    save_file(kohya, out_file, metadata={"format": "pt", "ss_network_dim": str(settings["r"]),
                                         "ss_network_alpha": str(alpha.item())})
