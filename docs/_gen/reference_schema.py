"""reference/experiment-schema.md: every section and key of an experiment file, from the
pydantic models in src/cifar4/config.py (types, defaults, bounds, descriptions), so a key added
to the schema appears on the page without editing it."""

from __future__ import annotations

from md import anchor, code, doc, field_rows, nested_models, table
from pydantic import BaseModel


def section_title(path: str) -> str:
    return "Top level" if not path else f"[{path}]"


def render(root: type[BaseModel]) -> str:
    sections = nested_models(root)
    titles = {m: section_title(p) for p, m in sections}

    def link(m: type[BaseModel]) -> str:
        return f"[{titles[m]}](#{anchor(titles[m])}) table"

    parts = ["# Experiment schema\n",
             "An experiment is a TOML file (or a built-in preset, see [Presets](presets.md)) checked by one "
             "schema: an unknown key, a wrong type or a value out of bounds is an error that names the file, "
             "the key and what is allowed. Every key is optional; a missing one takes the default below. "
             "This page is generated from the schema when the site is built.\n",
             "On the command line, `--set SECTION.KEY=VALUE` sets any key below "
             "(see [the command line](cli.md#cifar4-train)).\n"]
    for path, model in sections:
        title = titles[model]
        parts.append(f"## {title}\n")
        if doc(model):
            parts.append(doc(model) + "\n")
        where = f"`{path}`" if path else "the file's top level"
        parts.append(f"Keys of {where} ({code(model.__name__)}):\n")
        rows = field_rows(model, link)
        parts.append(table(["Key", "Type", "Default", "Bounds", "Description"], rows, drop_empty=True))
    return "\n".join(parts)


def main() -> str:
    from cifar4.config import Experiment
    return render(Experiment)
