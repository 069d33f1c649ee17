"""docs/config.md, generated from the config dataclasses: every key, its type, default and meaning (the comments
beside or above each field in the source). Regenerate after changing a config class:

    python -m onestep.config_reference > docs/config.md

(tests/test_config_reference.py fails while docs/config.md is out of date).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from typing import Any

from onestep.config import RunConfig, method_options


FIELD = re.compile(r"^    (\w+): [^=]+?(?:= (?P<default>.*?))?(?:\s+#\s*(?P<comment>.*))?$")


def field_comments(cls: type) -> dict[str, str]:
    """{field: its comment}: the comment lines right above the field and the one beside it, joined; fields a
    subclass inherits keep their base class's comment unless it declares them again with one."""
    comments = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base) and base is not object:
            comments.update({k: v for k, v in _own_comments(base).items() if v or k not in comments})
    return comments


def _own_comments(cls: type) -> dict[str, str]:
    comments, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        if line.strip().startswith("#"):
            above.append(line.strip().lstrip("#").strip())
            continue
        match = FIELD.match(line)
        if match and match.group(1) in cls.__annotations__:
            comments[match.group(1)] = " ".join([*above, match.group("comment") or ""]).strip()
        above = []
    return comments


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return "(required)" if value == "???" else f"`{value}`" if value else '`""`'
    return f"`{list(value) if isinstance(value, tuple) else value}`"


def rows(cls: type, prefix: str, instance: Any = None) -> list[str]:
    """Table rows `| key | type | default | meaning |` of a dataclass's fields, nested dataclasses flattened."""
    comments, out = field_comments(cls), []
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name) if instance is not None else _default(f)
        if dataclasses.is_dataclass(value):
            out += rows(type(value), f"{prefix}{f.name}.", value)
            continue
        meaning = comments.get(f.name, "").replace("|", "\\|")
        out.append(f"| `{prefix}{f.name}` | {str(f.type).replace('|', 'or')} | {_shown(value)} | {meaning} |")
    return out


def _table(title: str, cls: type | None, lines: list[str]) -> list[str]:
    own_doc = cls is not None and "__doc__" in vars(cls) and not (cls.__doc__ or "").startswith(f"{cls.__name__}(")
    intro = [inspect.cleandoc(cls.__doc__).split("\n\n")[0].replace("\n", " "), ""] if own_doc else []
    return [f"## {title}", "", *intro, "| key | type | default | meaning |", "|---|---|---|---|", *lines, ""]


def markdown() -> str:
    """The whole reference page."""
    from onestep.distillers import DISTILLERS

    parts = ["# Config reference", "",
             "Every key of a run config (`onestep train CONFIG.yaml key=value ...`), its type, default and meaning. "
             "Generated from the config classes by `python -m onestep.config_reference > docs/config.md`; do not "
             "edit by hand.", ""]
    for f in dataclasses.fields(RunConfig):
        value = _default(f)
        if f.name == "options":
            continue
        if dataclasses.is_dataclass(value):
            parts += _table(f"`{f.name}`", type(value), rows(type(value), f"{f.name}."))
    top = [f for f in dataclasses.fields(RunConfig)
           if not dataclasses.is_dataclass(_default(f)) and f.name != "options"]
    comments = field_comments(RunConfig)
    parts += _table("top level", None, [f"| `{f.name}` | {str(f.type).replace('|', 'or')} | {_shown(_default(f))} | "
                                       f"{comments.get(f.name, '')} |" for f in top])
    methods: dict[type, list[str]] = {}
    for method in ["teacher", "vae", *DISTILLERS]:
        methods.setdefault(method_options(method), []).append(method)
    for cls, names in methods.items():
        parts += _table(f"`options` of {', '.join(f'`{n}`' for n in names)} ({cls.__name__})", cls,
                        rows(cls, "options."))
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
