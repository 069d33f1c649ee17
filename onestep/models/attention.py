"""Which attention kernel every diffusers `Attention` layer of a network runs: xformers, PyTorch SDPA or eager.

diffusers' UNets pick their processor per layer at construction, and `UNet2DModel` has no `set_attn_processor`, so
the backend is set here by walking the modules. The choice itself (`resolve_backend`) is a pure function so that
the CUDA cases can be tested on a CPU-only machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnAddedKVProcessor,
    AttnAddedKVProcessor2_0,
    AttnProcessor,
    AttnProcessor2_0,
    JointAttnProcessor2_0,
    XFormersAttnAddedKVProcessor,
    XFormersAttnProcessor,
    XFormersJointAttnProcessor,
)
from diffusers.utils import is_xformers_available
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from onestep.errors import UserInputError
from onestep.models.networks import reachable_modules


BACKENDS = ("auto", "sdpa", "xformers", "eager")

# One row per kind of attention layer (plain self/cross attention; UnCLIP-style added key/value projections; SD3's
# joint attention, which has no eager kernel): the processor class of each backend. A layer keeps its kind, only its
# kernel changes. FLUX's attention layers are not diffusers `Attention` modules: they keep their own (SDPA) kernel.
_PROCESSORS: tuple[dict[str, type], ...] = (
    {"eager": AttnProcessor, "sdpa": AttnProcessor2_0, "xformers": XFormersAttnProcessor},
    {"eager": AttnAddedKVProcessor, "sdpa": AttnAddedKVProcessor2_0, "xformers": XFormersAttnAddedKVProcessor},
    {"sdpa": JointAttnProcessor2_0, "xformers": XFormersJointAttnProcessor},
)


XFORMERS = tuple(row["xformers"] for row in _PROCESSORS)


def resolve_backend(requested: str, device_type: str, xformers_available: bool) -> str:
    """The backend that `requested` means on `device_type`: `auto` is xformers on CUDA when it is usable (the
    DESIGN's choice for fused kernels), else SDPA, which has fused kernels on CUDA and on the CPU alike."""
    if requested not in BACKENDS:
        raise UserInputError(f"unknown attention backend {requested!r}; choose from {', '.join(BACKENDS)}")
    if requested == "auto":
        return "xformers" if device_type == "cuda" and xformers_available else "sdpa"
    if requested == "xformers" and device_type != "cuda":
        raise UserInputError(f"attention backend xformers needs a CUDA device, this model runs on {device_type}; "
                             "use attention=sdpa or auto")
    if requested == "xformers" and not xformers_available:
        raise UserInputError("attention backend xformers: xformers is not installed or does not run on this GPU "
                             "(pip install 'onestep[xformers]'); use attention=sdpa or auto")
    return requested


def xformers_available(device_type: str) -> bool:
    """Whether xformers imports and its kernel runs on `device_type`: a build that does not match the GPU or the
    torch version must make `auto` fall back to SDPA, not fail at the first training step."""
    if device_type != "cuda" or not is_xformers_available():
        return False
    import xformers.ops

    probe = torch.randn(1, 2, 40, device="cuda")
    try:
        xformers.ops.memory_efficient_attention(probe, probe, probe)
    except (RuntimeError, NotImplementedError, ValueError):
        return False
    return True


def model_device_type(model: nn.Module) -> str:
    """Where the model's parameters live (a model without parameters counts as on the CPU)."""
    first = next(model.parameters(), None)
    return "cpu" if first is None else first.device.type


def _processor(layer: Attention, backend: str) -> object:
    """A fresh processor of `backend` for a layer of the same kind as its current processor."""
    if backend == "sdpa" and not layer.scale_qk:
        raise UserInputError("an attention layer is unscaled (scale_qk=False), which SDPA's fixed 1/sqrt(d) scaling "
                             "does not compute; use attention=eager")
    current = type(layer.processor)
    for kinds in _PROCESSORS:
        if current in kinds.values():
            if backend not in kinds:
                raise UserInputError(f"attention processor {current.__name__} has no {backend} kernel; use "
                                     f"attention={' or '.join(kinds)}")
            return kinds[backend]()
    raise UserInputError(f"attention processor {current.__name__} is not one onestep can swap "
                         f"(it knows {', '.join(c.__name__ for kinds in _PROCESSORS for c in kinds.values())})")


def _install(models: list[nn.Module], backend: str) -> None:
    """Give every Attention layer of `models` a `backend` processor; all are built first so that an unsupported
    layer leaves every model as it was."""
    layers = [m for model in models for m in model.modules() if isinstance(m, Attention)]
    processors = [_processor(layer, backend) for layer in layers]
    for layer, processor in zip(layers, processors, strict=True):
        layer.set_processor(processor)


def set_attention_backend(model: nn.Module, backend: str = "auto", device_type: str | None = None) -> str:
    """Set the attention implementation of every diffusers Attention layer in `model`; returns the backend set.

    `device_type` is where the model will run, by default where its parameters are now: pass it when the model is
    moved later (accelerate moves networks at `prepare`), or `auto` would choose for the wrong device.
    """
    device_type = device_type or model_device_type(model)
    resolved = resolve_backend(backend, device_type, xformers_available(device_type))
    _install([model], resolved)
    return resolved


@contextlib.contextmanager
def differentiable_twice(model: nn.Module) -> Iterator[None]:
    """Attention whose backward can itself be differentiated (a gradient penalty's double backward) for the calls
    inside: PyTorch's math SDPA kernel. The fused SDPA kernels (flash, memory-efficient, the CPU's flash) have no
    derivative of their backward, and neither has xformers' kernel: a model set to xformers is refused."""
    if any(isinstance(m, Attention) and isinstance(m.processor, XFORMERS) for m in model.modules()):
        raise UserInputError("a gradient penalty (gan_r1_gamma > 0) needs a double backward through the critic, which "
                             "xformers attention lacks: use attention=sdpa")
    with sdpa_kernel(SDPBackend.MATH):
        yield


def set_task_attention_backend(task: object, backend: str, device_type: str) -> str:
    """`set_attention_backend` for every network reachable from a training task, resolved once for the device the
    task will train on; returns the backend set."""
    resolved = resolve_backend(backend, device_type, xformers_available(device_type))
    _install(reachable_modules(task), resolved)
    return resolved
