"""Atomic checkpoints: accelerate's save_state into a temporary folder, renamed into place when complete."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from onestep.errors import UserInputError
from onestep.files import write_json_atomic


COMPLETE_MARKER = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"checkpoint-{step:07d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a crash mid-save leaves only a `.tmp-*` folder, which is ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / COMPLETE_MARKER).read_text())


def save_checkpoint(accelerator, root: Path, step: int, state: dict, keep: int) -> Path:
    """Save all ranks' state, then (main process) write the marker, fsync and rename; prune to the last `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json_atomic(tmp / COMPLETE_MARKER, state)
            _fsync_tree(tmp)
    except OSError as err:  # disk full, quota, permissions: the half-written folder goes, the older ones stay
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(root)
        raise UserInputError(f"cannot write checkpoint {final.name} ({err.strerror or err}); the last complete one "
                             f"({last.name if last else 'none'}) is intact") from None
    if accelerator.is_main_process:
        if final.exists():  # re-saving the same step (e.g. after a resume): swap the old one out last
            old = root / f".old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        for stale in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def refuse_changed_frozen_tensors(models: list[nn.Module], input_dir: str, frozen: set[int]) -> None:
    """accelerate `load_state` pre-hook: refuse a checkpoint whose copy of a tensor the trained networks share with a
    frozen one (a LoRA base shared with the teacher, `lora.share_base`) differs from it. load_state copies every
    checkpointed tensor into the network in place, so it would write another teacher's weights into this run's
    frozen teacher; equal values (a normal resume) leave it as it is. `frozen`: ids of the frozen tensors;
    `models`: the prepared networks, in the order of their files (model.safetensors, model_1.safetensors, ...)."""
    from safetensors import safe_open

    for i, model in enumerate(models):
        shared = {name: t for name, t in model.state_dict(keep_vars=True).items() if id(t) in frozen}
        file = Path(input_dir) / f"model{f'_{i}' if i else ''}.safetensors"
        if not shared or not file.is_file():  # (no safetensors file: accelerate's own load reports it)
            continue
        with safe_open(file, "pt") as saved:
            keys = set(saved.keys())
            for name, tensor in shared.items():
                if name not in keys or not torch.equal(saved.get_tensor(name), tensor.detach().cpu()):
                    raise UserInputError(f"checkpoint {Path(input_dir).name} holds a different {name} than this "
                                         f"run's teacher (a LoRA base shared with it, lora.share_base): not resumed, "
                                         "the teacher is left as it is")
