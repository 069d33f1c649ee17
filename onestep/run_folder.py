"""Whether an output folder holds the same run as a config (resume), and moving an old run aside (`--overwrite`).

Two configs are the same run when what they train agrees: the method, its options, the teacher, the data and the
starting weights (`IDENTITY_KEYS`). Within those, paths are compared by what they name (the same folder written
relative or absolute, through a link, or a byte-identical copy), and what people change on a resume is allowed
(`RESUMABLE`): the data loader's workers, the batch size (with a note), the teacher's offloading and the learning
rates. Everything outside the identity keys (train.*: max_steps, max_minutes, logging, checkpoints; eval.*; attention)
may change freely.
"""

from __future__ import annotations

import filecmp
import fnmatch
import os
import sys
import time
from pathlib import Path

from onestep.models.loading import resolve_path


IDENTITY_KEYS = ("method", "data", "teacher", "init_generator", "init_critic", "options")
# dotted keys (fnmatch patterns) inside the identity keys that a resumed run may change
RESUMABLE = ("data.num_workers", "data.batch_size", "teacher.offload", "options.*optimizer.lr",
             "options.regression.pairs")  # read only if drawn for this run's teacher and conditions
NOTES = {"data.batch_size": "the optimizer state, LR schedule and EMA continue at their step; each step now sees "
                            "a different number of samples"}


def flatten(config: dict, prefix: str = "") -> dict:
    """{"a.b": value} of a nested dict (lists and other values are leaves)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _same_content(a: Path, b: Path) -> bool:
    """Whether two files, or two folders file by file, hold the same bytes (sizes first: a cheap no)."""
    if a.is_file() and b.is_file():
        return a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False)
    if not (a.is_dir() and b.is_dir()):
        return False
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    if files_a != sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()):
        return False
    if any((a / f).stat().st_size != (b / f).stat().st_size for f in files_a):
        return False
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def same_value(previous, current) -> bool:
    """Equal, or two strings naming the same file or folder (resolved, or a byte-identical copy)."""
    if previous == current:
        return True
    if not (isinstance(previous, str) and isinstance(current, str)):
        return False
    a, b = resolve_path(previous), resolve_path(current)
    if not (a.exists() and b.exists()):
        return False
    return a.resolve() == b.resolve() or os.path.samefile(a, b) or _same_content(a, b)


def _identity(config: dict) -> dict:
    return {key: value for key, value in flatten({k: config.get(k) for k in IDENTITY_KEYS}).items()
            if not any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE)}


def identity_differences(previous: dict, current: dict) -> list[str]:
    """The dotted identity keys whose values differ, each as `key (old -> new)`."""
    old, new = _identity(previous), _identity(current)
    return [f"{key} ({old.get(key)!r} -> {new.get(key)!r})" for key in sorted(old.keys() | new.keys())
            if not same_value(old.get(key), new.get(key))]


def resume_notes(previous: dict, current: dict) -> list[str]:
    """One line per allowed change of an identity key (a resumed run continues with the new value)."""
    old, new = flatten(previous), flatten(current)
    notes = []
    for key in sorted(k for k in new if any(fnmatch.fnmatchcase(k, p) for p in RESUMABLE)):
        if key in old and old[key] != new[key]:
            note = NOTES.get(key)
            notes.append(f"resuming with {key} {old[key]} -> {new[key]}" + (f" ({note})" if note else ""))
    return notes


def move_aside(out: Path) -> Path | None:
    """Move a non-empty output folder to a sibling `NAME.replaced-YYYYmmdd-HHMMSS` (nothing is deleted: the user
    deletes it, or renames it back) and say where on stderr; returns where it went (None: nothing to move)."""
    if not out.is_dir() or not any(out.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = out.with_name(f"{out.name}.replaced-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = out.with_name(f"{out.name}.replaced-{stamp}-{n}")
    os.replace(out, aside)
    print(f"onestep: --overwrite: moved the previous contents of {out} to {aside} (delete it when you no longer "
          "need it)", file=sys.stderr)
    return aside
