"""The teacher's rows of a benchmark table, computed once per teacher and protocol.

A teacher row (its Fréchet distances and metrics at K sampler steps, its images/s) depends only on the teacher's
weights and the protocol, so `onestep bench` and scripts/t2i_table.py look it up before sampling: first in the
teacher folder's `teacher_rows.json` (shipped with the builtin teachers, written by `python
scripts/teacher_rows.py`), then in the user cache ($ONESTEP_CACHE/teacher_rows, else
$XDG_CACHE_HOME or ~/.cache/onestep/teacher_rows); a miss is computed and stored in the user cache.

The key is a sha256 of the teacher's content (model_index.json and every file of its component folders: weights,
configs, tokenizer files; not its card or sample grid) and of the protocol, a JSON dict each table states in full
(steps, sampler, guidance, samples, seeds, the judges' weights, ...). A stored row keeps when, where and with which
command it was measured: its images/s are that machine's.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

from onestep.files import files_digest, write_json_atomic


CARD_FILE = "teacher_rows.json"


def folder_digest(folder: Path) -> str:
    """sha256 of every file in a folder (a judge's weights and config)."""
    return files_digest(folder, sorted(f for f in folder.rglob("*") if f.is_file()))


def teacher_digest(teacher: Path) -> str:
    """sha256 of what sampling a teacher folder reads: model_index.json and its component folders' files."""
    files = [f for f in teacher.rglob("*") if f.is_file() and (f.parent != teacher or f.name == "model_index.json")]
    return files_digest(teacher, sorted(files))


def row_key(teacher: Path, protocol: dict) -> str:
    source = {"teacher": teacher_digest(teacher), "protocol": protocol}
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:32]


def cache_dir() -> Path:
    root = os.environ.get("ONESTEP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "onestep"
    return Path(root) / "teacher_rows"


def _entries(path: Path) -> dict:
    try:
        return json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no file, or a damaged one: a miss (the row is recomputed)


def lookup(teacher: Path, protocol: dict) -> tuple[dict, str] | None:
    """(the stored row, where and when it was measured), or None."""
    key = row_key(teacher, protocol)
    for path in (teacher / CARD_FILE, cache_dir() / f"{key}.json"):
        entry = _entries(path).get(key)
        if entry is not None:
            return entry["row"], f"{path.name}: {entry['measured']}"
    return None


def store(path: Path, teacher: Path, protocol: dict, row: dict, command: str, header: dict | None = None) -> None:
    """Add (or replace) the row of `teacher` under `protocol` in the rows file at `path`."""
    import torch

    entries = _entries(path)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch " \
        f"{torch.__version__}"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entries[row_key(teacher, protocol)] = {"protocol": protocol, "row": row,
                                           "measured": f"{when} on {machine} by `{command}`"}
    write_json_atomic(path, {**(header or {}), "rows": entries})


def cached_row(teacher: Path, protocol: dict, compute: Callable[[], dict], command: str,
               use_cache: bool = True) -> dict:
    """The teacher's row under `protocol`: stored, else computed (and stored in the user cache); a stored row
    carries `cached` (where and when it was measured)."""
    if use_cache and (hit := lookup(teacher, protocol)) is not None:
        row, source = hit
        return {**row, "cached": source}
    row = compute()
    if use_cache:
        store(cache_dir() / f"{row_key(teacher, protocol)}.json", teacher, protocol, row, command)
    return row
