"""Reference tables in docs/ generated from the pydantic schemas, so that they cannot drift.

    python scripts/docs_tables.py          # rewrite the tables in place
    python scripts/docs_tables.py --check  # exit 1 if a table is out of date (tests/test_docs.py does this)

A table lives between ``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``.
"""

from __future__ import annotations

import enum
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [a for a in args if a is not type(None)]
        name = " \\| ".join(_type_name(a) for a in parts)
        return name + (" or null" if len(parts) < len(args) else "")
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if isinstance(t, type) and issubclass(t, BaseModel):
        return "section"
    if isinstance(t, type) and issubclass(t, enum.Enum):
        return " \\| ".join(f"`{m.value}`" for m in t)
    return getattr(t, "__name__", str(t))


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "(section defaults)"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return f"`{value}`"


def _models(t: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (``X``, ``X | None``)."""
    if isinstance(t, type) and issubclass(t, BaseModel):
        return [t]
    return [a for a in typing.get_args(t) if isinstance(a, type) and issubclass(a, BaseModel)]


def field_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        path = f"{prefix}{key}"
        desc = (field.description or "").replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")
        rows.append((f"`{path}`", _type_name(field.annotation), _default(field), desc))
        for sub in _models(field.annotation):
            rows.extend(field_rows(sub, prefix=f"{path}."))
    return rows


def recipe_table() -> str:
    from deltamoe.recipe import Recipe

    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in field_rows(Recipe)]
    return "\n".join(lines)


TABLES = {("docs/recipes.md", "recipe-fields"): recipe_table}


def render(text: str, name: str, table: str) -> str:
    pattern = re.compile(
        rf"(<!-- BEGIN GENERATED: {re.escape(name)} -->\n)(?:.*?\n)?(<!-- END GENERATED: {re.escape(name)} -->)", re.S
    )
    if not pattern.search(text):
        raise SystemExit(f"no GENERATED block {name!r}")
    return pattern.sub(lambda m: m[1] + table + "\n" + m[2], text)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for (page, name), make in TABLES.items():
        path = ROOT / page
        old = path.read_text()
        new = render(old, name, make())
        if new != old:
            stale.append(f"{page} ({name})")
            if not check:
                path.write_text(new)
    if check and stale:
        print("out of date: " + ", ".join(stale) + "; run python scripts/docs_tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
