"""Atomic file writes (a temporary file in the target's folder, moved over the target only when complete), and
JSON reads of user files that fail in one line."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from onestep.errors import UserInputError


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file to write; on success it replaces `path` (parents created), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, payload: dict) -> None:
    """JSON (sorted keys, indented) written through `atomic_file`."""
    with atomic_file(path) as f:
        f.write(json.dumps(payload, indent=2, sort_keys=True).encode())


def read_json(path: str | Path) -> dict:
    """A JSON object from a file the user pointed at; missing, a folder, not UTF-8, not JSON or not an object:
    UserInputError in one line."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"missing {path}") from None
    except (OSError, ValueError) as err:  # IsADirectoryError, UnicodeDecodeError, JSONDecodeError
        raise UserInputError(f"corrupt {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(value, dict):
        raise UserInputError(f"corrupt {path}: not a JSON object")
    return value
