"""Atomic checkpoints: accelerate's save_state into a temporary folder, renamed into place when complete.

The completion marker (`trainer_state.json`, written last) lists every file of the checkpoint with its size, so a
checkpoint damaged afterwards (a truncated file, a missing shard: a full disk on a copy, a partial sync) is found on
resume and passed over for the one before it (`verified_checkpoint`). Sizes, not hashes: a flipped bit inside a
file is not caught, but reading a checkpoint costs no extra pass over its gigabytes.
"""

from __future__ import annotations

import contextlib
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
MANIFEST = "files"  # the marker's key: {relative path: size in bytes} of every other file in the checkpoint
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"checkpoint-{step:07d}"


def step_of(checkpoint: Path) -> int:
    return int(_NAME.match(checkpoint.name).group(1))


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a crash mid-save leaves only a `.tmp-*` folder, which is ignored)."""
    if not root.is_dir():
        return []
    for old in root.glob(".old-checkpoint-*"):  # killed while re-saving a step: the old copy was moved aside
        final = root / old.name.removeprefix(".old-")
        if (old / COMPLETE_MARKER).is_file() and not final.exists():
            with contextlib.suppress(FileNotFoundError):  # another process put it back first
                os.replace(old, final)
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=step_of)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / COMPLETE_MARKER).read_text())


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (one line), or None: a listed file missing or of another
    size, an unreadable marker. Checkpoints written before the manifest existed are taken as they are."""
    try:
        listed = read_state(checkpoint).get(MANIFEST, {})
    except (OSError, ValueError) as err:
        return f"{COMPLETE_MARKER} unreadable ({err})"
    for name, size in listed.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} were written"
    return None


def require_intact(checkpoint: Path) -> Path:
    """`checkpoint` if it is complete and intact, else a UserInputError that says what is wrong."""
    what = damage(checkpoint) if (checkpoint / COMPLETE_MARKER).is_file() else "not a complete checkpoint"
    if what is not None:
        raise UserInputError(f"checkpoint {checkpoint}: {what}")
    return checkpoint


def checkpoint_at(root: Path, step: int) -> Path:
    """The complete, intact checkpoint of `step` under `root`; a missing one is a UserInputError naming those kept."""
    found = checkpoint_dir(root, step)
    if not (found / COMPLETE_MARKER).is_file():
        kept = ", ".join(str(step_of(c)) for c in complete_checkpoints(root)) or "none"
        raise UserInputError(f"no complete checkpoint of step {step} in {root} (steps kept: {kept})")
    return require_intact(found)


def verified_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint whose files are intact, and one line for each newer one that is damaged."""
    damaged = []
    for checkpoint in reversed(complete_checkpoints(root)):
        what = damage(checkpoint)
        if what is None:
            return checkpoint, damaged
        damaged.append(f"checkpoint {checkpoint} is damaged ({what}); passed over")
    return None, damaged


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
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            write_json_atomic(tmp / COMPLETE_MARKER, {**state, MANIFEST: files})
            _fsync_tree(tmp)
    except OSError as err:  # disk full, quota, permissions: the half-written folder goes, the older ones stay
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(root)
        raise UserInputError(f"cannot write checkpoint {final.name} ({err.strerror or err}); the last complete one "
                             f"({last.name if last else 'none'}) is intact") from None
    except BaseException:  # a second stop signal: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if final.exists():  # re-saving the same step (e.g. after a resume): swap the old one out last
            old = root / f".old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        # newer ones are from before a resume that passed them over (damaged): this run has left them behind
        newer = [c for c in complete_checkpoints(root) if step_of(c) > step]
        older = [c for c in complete_checkpoints(root) if step_of(c) <= step]
        for stale in newer + (older[:-keep] if keep > 0 else []):
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
