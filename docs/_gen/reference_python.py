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
            parts += [f"::: {package.__name__}.{n}\n" for n in groups[g]]
    return "\n".join(parts)


def main() -> str:
    import cifar4
    return render(cifar4)
