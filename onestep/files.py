"""Atomic file and folder writes (a temporary file or folder beside the target, moved over the target only when
complete), JSON reads of user files that fail in one line, and content digests of files (cache keys)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterable, Iterator
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
        os.fchmod(fd, file_mode())  # mkstemp's 600 would hide exports from other users and serving containers
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_mode(folder: bool = False) -> int:
    """The mode the umask gives a new file (rw-r--r-- under umask 022) or folder (rwxr-xr-x)."""
    mask = os.umask(0o022)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def _use_umask_modes(folder: Path) -> None:
    """Give what a writer left in `folder` the umask's modes (safetensors and tempfile-based writers leave 600).
    Files linked from elsewhere (more than one link) keep theirs: `link_or_copy` links only files that have it."""
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, file_mode(folder=True))
        elif path.stat().st_nlink == 1:
            os.chmod(path, file_mode())


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


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """A hard link of `src` at `dst` (no second copy of large weights), or a copy (with the umask's mode) where links
    are not possible or `src` has another mode than the umask gives (a link shares its mode with `src`)."""
    if stat.S_IMODE(os.stat(src).st_mode) == file_mode():
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system, or links not allowed
            pass
    shutil.copyfile(src, dst)


@contextmanager
def atomic_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh hidden sibling folder to fill; when the block succeeds it replaces `out_dir`.

    An existing `out_dir` is moved aside and deleted only after the new folder is in place; on error the new folder
    is removed and `out_dir` is left as it was.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"{out_dir} exists and is not a folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}-{uuid.uuid4().hex[:12]}.tmp")
    old = tmp.with_suffix(".old")
    tmp.mkdir()
    try:
        yield tmp
        _use_umask_modes(tmp)
        if out_dir.exists():
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if old.exists():
                os.replace(old, out_dir)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Remove the temporary files and folders that `atomic_file` / `atomic_folder` left in `folder` when their
    process was killed (hidden, ending in .tmp or .old); returns them. Only for a folder no other process writes."""
    found = [p for p in Path(folder).glob(".*") if p.suffix in (".tmp", ".old")] if Path(folder).is_dir() else []
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def files_digest(root: Path, files: Iterable[Path]) -> str:
    """sha256 over files' paths relative to `root` and their bytes, in the order given: a cache key's content."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()
