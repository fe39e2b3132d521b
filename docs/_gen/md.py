"""Markdown helpers shared by the reference generators: escaping, tables, and the fields of a
pydantic model (the experiment schema and the run record are both pydantic models)."""

from __future__ import annotations

import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "src") not in sys.path:  # the reference describes this checkout's code, not an installed copy
    sys.path.insert(0, str(ROOT / "src"))

from pydantic import BaseModel  # noqa: E402

_SPECIAL = re.compile(r"([\\*_\[\]<>|#])")


def escape(text: str) -> str:
    """Text safe inside Markdown (and a table cell): `code spans` kept, specials escaped, one line."""
    parts = str(text).split("`")
    out = [p if i % 2 else _SPECIAL.sub(r"\\\1", p) for i, p in enumerate(parts)]
    return " ".join("`".join(out).split())


def code(value: Any) -> str:
    """A value as inline code (backticks inside doubled, as Markdown wants)."""
    s = str(value)
    return f"`` {s} ``" if "`" in s else f"`{s}`"


def table(header: list[str], rows: list[list[str]], drop_empty: bool = False) -> str:
    """A Markdown table; `drop_empty` leaves out the columns no row fills."""
    if not rows:
        return ""
    if drop_empty:
        keep = [i for i in range(len(header)) if i == 0 or any(r[i] for r in rows)]
        header, rows = [header[i] for i in keep], [[r[i] for i in keep] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def anchor(title: str) -> str:
    """The id MkDocs' toc gives a heading (Python-Markdown's default slugify)."""
    s = re.sub(r"[^\w\s-]", "", title).strip().lower()
    return re.sub(r"[-\s]+", "-", s)


# ---------------------------------------------------------------- pydantic models

def is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def type_name(t: Any, link: typing.Callable[[type[BaseModel]], str] | None = None) -> str:
    """A readable type: `"a" | "b"` for literals, `list of int`, `table of X`, a section link for a model."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if t is type(None):
        return "none"
    if t is Any:
        return "any"
    if origin is Literal:
        return " \\| ".join(code(f'"{a}"' if isinstance(a, str) else a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a, link) for a in args)
    if origin in (list, tuple, set):
        inner = [a for a in args if a is not Ellipsis]
        if origin is tuple and len(inner) > 1 and Ellipsis not in args:
            return f"[{', '.join(type_name(a, link) for a in inner)}]"
        return f"list of {type_name(inner[0], link)}" if inner else "list"
    if origin is dict:
        return f"table of {type_name(args[1], link)}" if args else "table"
    if origin is typing.Annotated:
        return type_name(args[0], link)
    if is_model(t):
        return link(t) if link else t.__name__
    name = getattr(t, "__name__", str(t))
    return _NAMES.get(name, name)


_CONSTRAINTS = {"exclusiveMinimum": "> {}", "minimum": "≥ {}", "exclusiveMaximum": "< {}", "maximum": "≤ {}",
                "minLength": "at least {} characters", "maxLength": "at most {} characters",
                "minItems": "at least {} item(s)", "maxItems": "at most {} item(s)", "pattern": "matches {}"}
_NAMES = {"str": "string", "int": "integer", "bool": "boolean", "float": "float"}


def constraints(prop: dict[str, Any]) -> list[str]:
    """The bounds a JSON-schema property carries, in words (also inside anyOf: optional fields)."""
    fixed = "prefixItems" in prop  # a pair [low, high]: its length is in its type already
    out = [fmt.format(code(prop[k]) if k == "pattern" else prop[k]) for k, fmt in _CONSTRAINTS.items()
           if k in prop and not (fixed and k in ("minItems", "maxItems"))]
    for alt in prop.get("anyOf", []):
        out += constraints(alt)
    return out


def default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if is_model(type(value)):
        return "its defaults"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return code(str(value).lower())
    if isinstance(value, str):
        return code(f'"{value}"')
    return code(value)


def description(field: Any, prop: dict[str, Any]) -> str:
    text = field.description or prop.get("description") or ""
    return escape(text)


def field_rows(model: type[BaseModel], link: typing.Callable[[type[BaseModel]], str] | None = None,
               with_default: bool = True) -> list[list[str]]:
    """One row per field: key (its alias where it has one), type, [default,] constraints and description."""
    props = model.model_json_schema(by_alias=True).get("properties", {})
    rows = []
    for name, f in model.model_fields.items():
        key = f.alias or name
        prop = props.get(key, {})
        row = [code(key), type_name(f.annotation, link)]
        if with_default:
            row.append(default_text(f))
        row += [", ".join(constraints(prop)), description(f, prop)]
        rows.append(row)
    return rows


def nested_models(model: type[BaseModel], path: str = "") -> list[tuple[str, type[BaseModel]]]:
    """(key path, model) for `model` and every model its fields hold, depth first; a table of
    models shows as `key.*`, a list of them as `key[]`."""
    out: list[tuple[str, type[BaseModel]]] = [(path, model)]
    for name, f in model.model_fields.items():
        key = f"{path}.{f.alias or name}" if path else (f.alias or name)
        for t, suffix in _models_in(f.annotation):
            if all(m is not t for _, m in out):
                out += [(p, m) for p, m in nested_models(t, key + suffix) if all(m is not o for _, o in out)]
    return out


def _models_in(t: Any, suffix: str = "") -> list[tuple[type[BaseModel], str]]:
    if is_model(t):
        return [(t, suffix)]
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is dict and args:
        return _models_in(args[1], suffix + ".*")
    if origin in (list, tuple, set) and args:
        return _models_in(args[0], suffix + "[]")
    return [m for a in args for m in _models_in(a, suffix)]


def doc(model: type[BaseModel]) -> str:
    """A model's own docstring (pydantic's BaseModel docstring is not one)."""
    d = model.__doc__
    return "" if not d or d is BaseModel.__doc__ else " ".join(d.split())
