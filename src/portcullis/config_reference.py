"""The configuration reference (docs/config-reference.md), generated from the config model itself.

Every key of every section with its type, default and meaning. The meaning is the comment written
above the field (or after it on the same line) in config.py, so the code and its reference cannot drift
apart: `portcullis config reference > docs/config-reference.md` rewrites it, and a test fails when the
committed page differs from what the model says now.
"""

from __future__ import annotations

import inspect
import io
import json
import tokenize
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from portcullis import config as config_module
from portcullis.config import Config

_HEADER = """# Configuration reference

Generated from the config model (`src/portcullis/config.py`) by `portcullis config reference`; do not edit by
hand (a test compares this page with the model). What the sections are for, with examples:
[configuration.md](configuration.md). `<name>` stands for a key you choose (a model's, a tier's, a
moderator's name). Every key can also be set from the environment: `PORTCULLIS_<SECTION>__<KEY>=value`.
"""


def _comments(cls: type[BaseModel]) -> dict[str, str]:
    """Field name → the comment above its line (contiguous `#` lines) or at the end of it, in the class or
    the config section it inherits from."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if isinstance(klass, type) and issubclass(klass, BaseModel) and klass is not BaseModel:
            found.update({k: v for k, v in _own_comments(klass, cls).items() if v})
    return found


def _own_comments(cls: type[BaseModel], model: type[BaseModel]) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1].strip() != tok.string:
            trailing[tok.start[0]] = tok.string.lstrip("#").strip()
    found: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0]
        if not name.isidentifier() or name not in model.model_fields or line[:4] != "    " or line[4] == " ":
            continue
        above: list[str] = []
        i = number - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        text = " ".join(above + ([trailing[number]] if number in trailing else []))
        found[name] = text.replace("|", "\\|")
    return found


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        names = list(dict.fromkeys(_type_name(a) for a in args if a is not type(None)))
        text = " \\| ".join(names)
        return text + (" \\| null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"map of {_type_name(args[1])}" if len(args) == 2 else "map"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "section"
        if issubclass(annotation, Enum):
            return " \\| ".join(str(m.value) for m in annotation)
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "Path": "path"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
        return ", ".join(value)
    return f"`{json.dumps(value, default=str)}`"


def _sections(annotation: Any) -> list[type[BaseModel]]:
    """The config sections a field holds directly, in a map, or as one of a union's members."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is typing.Annotated:
        return _sections(args[0])
    if origin in (Union, types.UnionType):
        return [s for a in args for s in _sections(a)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _rows(cls: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    comments = _comments(cls)
    for name, field in cls.model_fields.items():
        key = field.alias or name
        annotation = field.annotation
        in_map = get_origin(annotation) is dict
        in_list = get_origin(annotation) is list
        inner = get_args(annotation)[-1] if (in_map or in_list) and get_args(annotation) else annotation
        sections = _sections(inner)
        path = f"{prefix}{key}"
        meaning = comments.get(name, "")
        if not meaning and sections and sections[0].__doc__ and len(sections) == 1:
            meaning = " ".join(line.strip() for line in sections[0].__doc__.strip().splitlines())
        rows.append((path, _type_name(annotation), _default(field), meaning))
        member_path = path + (".<name>" if in_map else "[]" if in_list else "")
        seen: set[str] = set()
        for section in sections:
            kind = section.model_fields.get("kind")
            if kind is not None and len(sections) > 1:  # one member of a union: its own keys, the shared ones once
                tag = get_args(kind.annotation)[0]
                doc = " ".join(line.strip() for line in (section.__doc__ or "").strip().splitlines())
                rows.append((f"{member_path} (kind: {tag})", "section", "", doc))
            for row in _rows(section, member_path + "."):
                if row[0] not in seen or row[0].endswith(".kind"):
                    seen.add(row[0])
                    rows.append(row)
    return rows


def render() -> str:
    out = [_HEADER]
    for name, field in Config.model_fields.items():
        out.append(f"\n## {name}\n")
        doc = _comments(Config).get(name)
        annotation = field.annotation
        sections = _sections(get_args(annotation)[-1] if get_origin(annotation) is dict else annotation)
        if sections and sections[0].__doc__:
            doc = " ".join(line.strip() for line in sections[0].__doc__.strip().splitlines())
        if doc:
            out.append(doc + "\n")
        out.append("| key | type | default | meaning |")
        out.append("|---|---|---|---|")
        for path, typ, default, meaning in _field_rows(name, field):
            out.append(f"| `{path}` | {typ} | {default} | {meaning} |")
    return "\n".join(out) + "\n"


def _field_rows(name: str, field: FieldInfo) -> list[tuple[str, str, str, str]]:
    """The rows of one top-level section: its own keys, or (for maps of sections) those of one entry."""
    annotation = field.annotation
    if get_origin(annotation) is dict:
        return [row for section in _sections(get_args(annotation)[1]) for row in _rows(section, f"{name}.<name>.")]
    return [row for section in _sections(annotation) for row in _rows(section, f"{name}.")]


def reference_path() -> Path:
    return Path(config_module.__file__).resolve().parents[2] / "docs" / "config-reference.md"
