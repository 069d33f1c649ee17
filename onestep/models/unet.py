"""Calling a diffusers UNet in onestep's convention: one place for the call signature and the x0 read-out."""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator

import torch
import torch.utils.checkpoint
from diffusers import ModelMixin
from torch import nn

from onestep.models.conditioning import Condition
from onestep.models.networks import frozen_parameters, is_sharded
from onestep.models.schedules import Schedule
from onestep.pipelines.pipeline_onestep import flow_transformer_call, is_flow_transformer


def takes_text(unet: nn.Module) -> bool:
    """True for UNet2DConditionModel-like modules and flow transformers (an `encoder_hidden_states` argument)."""
    return "encoder_hidden_states" in inspect.signature(unet.forward).parameters


def unet_forward(unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: Condition,
                 schedule: Schedule | None = None) -> torch.Tensor:
    """The raw output of a denoiser (a diffusers UNet, or a flow transformer: SD3's, FLUX's) at (x_t, grid time t)
    for a batch condition, run in its dtype; it takes `schedule.network_time(t)` (a UNet without a schedule: t)."""
    dtype = next(unet.parameters()).dtype
    t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
    if is_flow_transformer(unet):
        if schedule is None:
            raise ValueError("a flow transformer's timestep input needs its schedule")
        return flow_transformer_call(unet, x_t, schedule.network_time(t), **condition.flow_kwargs())
    time = t if schedule is None else schedule.network_time(t)
    return unet(x_t.to(dtype), time, **condition.unet_kwargs(dtype), return_dict=False)[0]


def unet_x0(unet: nn.Module, schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, condition: Condition,
            prediction_type: str | None = None) -> torch.Tensor:
    """One denoiser call read out as an x0-prediction in float32 (teacher, generator and critics all use this)."""
    t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
    return schedule.to_x0(unet_forward(unet, x_t, t, condition, schedule), x_t, t, prediction_type)


def diffusers_models(module: nn.Module) -> list[ModelMixin]:
    """The diffusers models inside `module`, itself included: a generator's or critic's UNet, a teacher's parts."""
    return [m for m in module.modules() if isinstance(m, ModelMixin)]


def enable_gradient_checkpointing(module: nn.Module) -> None:
    """diffusers' activation checkpointing in every model of `module` that has it: their blocks recompute their
    activations in the backward pass instead of keeping them (`call_frozen` stays correct for such modules)."""
    for model in diffusers_models(module):
        if model._supports_gradient_checkpointing:
            model.enable_gradient_checkpointing()


def _checkpointing_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if getattr(m, "gradient_checkpointing", False) is True]


@contextlib.contextmanager
def _not_checkpointing(layers: list[nn.Module]) -> Iterator[None]:
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True


def call_frozen(module: nn.Module, *args, checkpoint: bool = False, **kwargs):
    """`module(*args, **kwargs)` with gradients flowing to the inputs only, never to `module`'s parameters.

    The parameters enter as detached tensors (`torch.func.functional_call`) instead of having `requires_grad`
    toggled. With `checkpoint` the whole call is recomputed in the backward pass instead of keeping its activations;
    the recomputation runs this same function, so it sees the same detached parameters as the forward did.

    A module whose own layers checkpoint (`enable_gradient_checkpointing`) is checkpointed that way as a whole, its
    layers' checkpointing off for the call: they would recompute in the backward pass after this call has put the
    live parameters back, and send those parameters gradients.

    A module sharded by FSDP2 gathers its parameters in its own forward, which would replace detached ones: it runs
    as it is, with `requires_grad` off for the call (and for its recomputation).
    """
    layers = _checkpointing_layers(module)
    sharded = is_sharded(module)
    detached = {} if sharded else {name: p.detach() for name, p in module.named_parameters()}

    def call(*inputs):
        with _not_checkpointing(layers):
            if sharded:
                with frozen_parameters(module):
                    return module(*inputs, **kwargs)
            return torch.func.functional_call(module, detached, inputs, kwargs)

    if (checkpoint or layers) and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(call, *args, use_reentrant=False)
    return call(*args)


def trainable_copy(unet: nn.Module, share_frozen: bool = False) -> nn.Module:
    """A float32, trainable deep copy of a (frozen) teacher UNet: a generator's or fake score's starting network.

    `share_frozen`: a copy of the module tree whose parameters and buffers ARE the teacher's (its dtype, frozen,
    no memory), for networks that only train LoRA adapters added later (`onestep.models.lora.add_lora`). Weights
    loaded into such a copy must go through `load_weights`, which gives it tensors of its own instead of writing into
    the teacher's.
    """
    if share_frozen:
        return copy.deepcopy(unet, memo={id(t): t for t in (*unet.parameters(), *unet.buffers())}).train()
    return copy.deepcopy(unet).float().train().requires_grad_(True)


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True):
    """`module.load_state_dict(state)` in each tensor's current dtype, without writing into the current tensors
    (they may be a teacher's, shared by `trainable_copy`): the loaded tensors replace them (`assign`), keeping
    `requires_grad`. Returns load_state_dict's (missing, unexpected) keys."""
    current = module.state_dict()
    state = {k: v.to(current[k].dtype) if k in current else v for k, v in state.items()}
    return module.load_state_dict(state, strict=strict, assign=True)


def reduced_unet(unet: nn.Module, block_out_channels: list[int]) -> nn.Module:
    """A freshly initialised UNet of `unet`'s class and config with other channel widths (MSD's smaller students).

    Timestep embedding, class embeddings and cross-attention keep their configuration, so the smaller network takes
    exactly the teacher's inputs and conditions.
    """
    if len(block_out_channels) != len(unet.config.block_out_channels):
        raise ValueError(f"block_out_channels needs {len(unet.config.block_out_channels)} widths (one per block), "
                         f"got {list(block_out_channels)}")
    groups = unet.config.norm_num_groups
    if any(c % groups for c in block_out_channels):
        raise ValueError(f"every width in block_out_channels must be a multiple of norm_num_groups {groups}, "
                         f"got {list(block_out_channels)}")
    return type(unet).from_config({**unet.config, "block_out_channels": list(block_out_channels)})


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
