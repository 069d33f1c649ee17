"""Prompt files for text teachers: one prompt per line, UTF-8."""

from __future__ import annotations

from pathlib import Path

from onestep.errors import UserInputError


def read_prompts(path: Path) -> list[str]:
    """Non-empty prompts, one per line; an empty line is an error (it would silently train the null prompt)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserInputError(f"prompt file not found: {path}") from None
    except UnicodeDecodeError:
        raise UserInputError(f"prompt file {path} is not UTF-8 text") from None
    except OSError as err:  # a folder, unreadable
        raise UserInputError(f"cannot read prompt file {path}: {err.strerror or err}") from None
    prompts = [line.strip() for line in lines]
    empty = [i + 1 for i, p in enumerate(prompts) if not p]
    if empty:
        raise UserInputError(f"prompt file {path} has empty lines (line {empty[0]}"
                             f"{f' and {len(empty) - 1} more' if len(empty) > 1 else ''})")
    if not prompts:
        raise UserInputError(f"prompt file {path} holds no prompts")
    return prompts
