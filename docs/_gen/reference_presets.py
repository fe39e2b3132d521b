"""reference/presets.md: the built-in experiments (the TOML files in src/cifar4/experiments/),
each with its description and the keys it sets, grouped by model; a new file there appears on
the page without editing it."""

from __future__ import annotations

from typing import Any

import tomli_w
from md import anchor, code, escape, table


def toml_value(v: Any) -> str:
    """A value as TOML writes it (strings quoted, booleans lowercase, inline arrays and tables)."""
    text = tomli_w.dumps({"v": [v]})  # in an array, tables are written inline
    return text.split("=", 1)[1].strip()[1:-1].strip().rstrip(",")


def rows(d: dict[str, Any]) -> list[list[str]]:
    from cifar4.config import flatten
    out = []
    for key, value in d.items():
        if key in ("name", "description"):
            continue
        if isinstance(value, list) and value and all(isinstance(t, dict) for t in value):
            for i, t in enumerate(value):
                out += [[code(f"{key}[{i}].{k}"), code(toml_value(v))] for k, v in flatten(t).items()]
        elif isinstance(value, dict):
            out += [[code(f"{key}.{k}"), code(toml_value(v))] for k, v in flatten(value).items()]
        else:
            out.append([code(key), code(toml_value(value))])
    return out


def group_of(d: dict[str, Any]) -> str:
    if "ensemble" in d:
        return "Ensembles"
    if "sweep" in d:
        return "Sweeps"
    return f"Model {d.get('model', {}).get('name', 'cnn')}"


def source(name: str, text: str) -> str:
    """The file itself, folded: its comments say why each value is what it is."""
    body = "\n".join("    " + line if line else "" for line in ["```toml", *text.rstrip().splitlines(), "```"])
    return f'??? note "{name}.toml"\n\n{body}\n'


def render(experiments: dict[str, dict[str, Any]], model_help: dict[str, str],
           texts: dict[str, str] | None = None) -> str:
    groups: dict[str, list[str]] = {}
    for name, d in experiments.items():
        groups.setdefault(group_of(d), []).append(name)
    order = sorted(groups, key=lambda g: (g in ("Sweeps", "Ensembles"), g))
    parts = ["# Presets\n",
             "The built-in experiments, generated from the TOML files in `src/cifar4/experiments/` when the "
             "site is built. Each is a starting point: `cifar4 train --preset NAME` trains it, and any flag or "
             "`--set SECTION.KEY=VALUE` changes one of its keys. Keys not listed take the defaults of the "
             "[experiment schema](experiment-schema.md).\n",
             table(["Group", "Presets"], [[f"[{g}](#{anchor(g)})", ", ".join(f"[{code(n)}](#{anchor(n)})"
                                                                          for n in groups[g])] for g in order])]
    for g in order:
        parts.append(f"## {g}\n")
        model = g.removeprefix("Model ") if g.startswith("Model ") else None
        if model and model in model_help:
            parts.append(f"The model `{model}`: {escape(model_help[model])}\n")
        for name in groups[g]:
            d = experiments[name]
            parts.append(f"### {name}\n")
            if d.get("description"):
                parts.append(escape(d["description"]) + "\n")
            parts.append(f"```bash\ncifar4 train --preset {name}\n```\n")
            parts.append(table(["Key", "Value"], rows(d)))
            if texts and name in texts:
                parts.append(source(name, texts[name]))
    return "\n".join(parts)


def main() -> str:
    from importlib import resources

    from cifar4 import config
    from cifar4.models import registry
    names = config.builtin_names()
    texts = {n: (resources.files("cifar4") / "experiments" / f"{n}.toml").read_text(encoding="utf-8") for n in names}
    experiments = {n: config.load_dict(n)[0] for n in names}
    return render(experiments, {n: registry.spec(n).description for n in registry.names()}, texts)
