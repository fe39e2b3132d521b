"""reference/run-directory.md: the files of a run folder and every key of the JSON and TOML
files in it, from the pydantic models of the run record (`cifar4.record.RECORD_FILES`, file name
-> model), so a metrics key added there appears on the page without editing it."""

from __future__ import annotations

import importlib
from typing import Any

from md import anchor, code, doc, escape, field_rows, nested_models, table
from pydantic import BaseModel


def file_md(filename: str, model: type[BaseModel], elsewhere: dict[type[BaseModel], str]) -> list[str]:
    if model in elsewhere:  # a schema with a page of its own (config.toml: the experiment schema)
        return [f"## {filename}\n", (escape(doc(model)) + " " if doc(model) else "")
                + f"Its keys are those of the {elsewhere[model]}.\n"]
    sections = nested_models(model)
    titles = {m: filename if not p else f"{filename}: {p}" for p, m in sections}

    def link(m: type[BaseModel]) -> str:
        return f"[{escape(titles[m])}](#{anchor(titles[m])})"

    parts = []
    for path, m in sections:
        parts.append(f"{'##' if not path else '###'} {titles[m]}\n")
        if doc(m):
            parts.append(escape(doc(m)) + "\n")
        parts.append(table(["Key", "Type", "Default", "Bounds", "Description"], field_rows(m, link), drop_empty=True))
    return parts


def render(record_files: dict[str, type[BaseModel]] | None, run_files: tuple[str, ...],
           history_keys: tuple[str, ...] = (), elsewhere: dict[type[BaseModel], str] | None = None) -> str:
    """The page; `elsewhere` maps a model documented on another page to a link to it."""
    names = list(dict.fromkeys([*(record_files or {}), *run_files]))
    rows = []
    for n in names:
        what = ""
        if record_files and n in record_files:
            first = doc(record_files[n]).removeprefix(f"{n}:").strip().split(". ")[0].rstrip(".")
            first = first[:1].upper() + first[1:]
            what = (escape(first) + ": " if first else "") + f"[its keys](#{anchor(n)})"
        if n == "history.csv" and history_keys:
            what = "One row per epoch, columns " + ", ".join(code(k) for k in history_keys)
        rows.append([code(n), what])
    parts = ["# Run directory\n",
             "What `cifar4 train` (and `ensemble`, `lab`) writes into a run folder, "
             "`runs/<experiment>-<YYYYmmdd-HHMMSS>/` by default; `metrics.json` is written last, so a "
             "folder that has it is a finished run. Generated from the run record's code when the site is "
             "built.\n",
             table(["File", "Contents"], rows)]
    if record_files is None:
        parts.append("The keys of each file are listed here when the code has the run record's models "
                     "(`cifar4.record`).\n")
        return "\n".join(parts)
    for name, model in record_files.items():
        parts += file_md(name, model, elsewhere or {})
    return "\n".join(parts)


def main() -> str:
    from cifar4 import runs
    from cifar4.config import Experiment
    record_files: dict[str, Any] | None
    try:
        record_files = importlib.import_module("cifar4.record").RECORD_FILES
    except ModuleNotFoundError as e:
        if e.name != "cifar4.record":
            raise
        record_files = None
    return render(record_files, tuple(runs.RUN_FILES), tuple(getattr(runs, "HISTORY_KEYS", ())),
                  {Experiment: "[experiment schema](experiment-schema.md)"})
