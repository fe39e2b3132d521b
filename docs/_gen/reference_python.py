"""reference/python-api.md: the public Python API, `cifar4`'s top-level exports (its `__all__`),
each rendered by mkdocstrings from its signature and docstring, so an export added to
src/cifar4/__init__.py appears on the page without editing it."""

from __future__ import annotations

import inspect
from typing import Any

GROUPS = ("Functions", "Classes", "Errors", "Constants")


def group_of(obj: Any) -> str:
    if inspect.isclass(obj):
        return "Errors" if issubclass(obj, BaseException) else "Classes"
    return "Functions" if callable(obj) else "Constants"


def identifier(package: Any, name: str) -> str:
    """Where mkdocstrings finds an export: a function or class where it is defined (the package
    may re-export it under a name a submodule also has), anything else under the package."""
    obj = getattr(package, name)
    if (inspect.isclass(obj) or inspect.isfunction(obj)) and "<" not in obj.__qualname__:
        return f"{obj.__module__}.{obj.__qualname__}"
    return f"{package.__name__}.{name}"


def render(package: Any) -> str:
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name in package.__all__:
        groups[group_of(getattr(package, name))].append(name)
    parts = ["# Python API\n",
             f"The public API of `{package.__name__}`: what a notebook imports. Each command of the "
             f"[command line](cli.md) has its function here. Generated from the code's signatures and "
             f"docstrings when the site is built.\n"]
    for g in GROUPS:
        if groups[g]:
            parts.append(f"## {g}\n")
            parts += [f"::: {identifier(package, n)}\n    options:\n      heading: \"{package.__name__}.{n}\"\n"
                      f"      toc_label: \"{n}\"\n" for n in groups[g]]
    modules = sorted({identifier(package, n).rsplit(".", 1)[0] for n in package.__all__} - {package.__name__})
    parts.append("## Modules\n\nWhere each of these lives, and what that module owns (its docstring); "
                 "the functions above are the ones a notebook needs.\n")
    parts += [f"::: {m}\n    options:\n      members: false\n      show_root_full_path: true\n"
              f"      toc_label: \"{m}\"\n" for m in modules]
    return "\n".join(parts)


def main() -> str:
    import cifar4
    return render(cifar4)
