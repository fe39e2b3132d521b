"""reference/cli.md: every command, subcommand, argument and option of `cifar4`, walked from
the command tree that typer builds from src/cifar4/cli.py, so a command or flag added there
appears on the page without editing it. Hidden options are left out unless they are
deprecated spellings, which are listed as such.

The tree is read through the attributes click's commands and parameters have (typer's own
copy of click, from typer 0.29 on, keeps them), never through isinstance checks on click's
classes, so the page does not depend on which of the two built it."""

from __future__ import annotations

import inspect
from typing import Any

from md import anchor, code, escape, table


def is_group(cmd: Any) -> bool:
    return hasattr(cmd, "list_commands")


def walk(cmd: Any, ctx: Any) -> list[tuple[Any, Any]]:
    """The command and its visible subcommands, depth first, each with its context."""
    out = [(ctx, cmd)]
    if is_group(cmd):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                out += walk(sub, sub.context_class(sub, info_name=name, parent=ctx))
    return out


def kind(p: Any) -> str:
    return getattr(p, "param_type_name", "")  # "option" or "argument"


def old_spelling(p: Any) -> bool:
    """A renamed option's old spelling: hidden from --help, its help naming the replacement
    (cli._deprecated), listed here so a user reading an old script finds what it became."""
    return bool(getattr(p, "hidden", False)) and str(getattr(p, "help", "") or "").startswith("Deprecated:")


def shown(p: Any) -> bool:
    return not getattr(p, "hidden", False) or bool(getattr(p, "deprecated", False)) or old_spelling(p)


def _plain(c: Any) -> str:
    return str(getattr(c, "value", c))


def choices(p: Any) -> list[str]:
    desc = getattr(p, "type_descriptor", None)  # typer >= 0.29 describes a parameter's type itself
    if desc is not None:
        return [_plain(c) for c in desc.choices or ()] if desc.is_choice else []
    return [_plain(c) for c in getattr(p.type, "choices", None) or ()]


_TYPES = {"int": "integer", "str": "text", "bool": "boolean", "string": "text"}


def type_words(p: Any, ctx: Any) -> tuple[str, Any, Any]:
    """The type's name in words, and its bounds (None where open)."""
    if hasattr(p, "display_type"):  # typer >= 0.29
        name = p.display_type(ctx).strip("<>")
        return name, getattr(p, "min", None), getattr(p, "max", None)
    info = p.type.to_info_dict()
    return str(info.get("name", p.type.name)), info.get("min"), info.get("max")


def value_text(p: Any, ctx: Any) -> str:
    """What the parameter takes: a flag, its choices, its metavar, or its type and range."""
    if kind(p) == "option" and getattr(p, "is_flag", False):
        return "flag"
    name, lo, hi = type_words(p, ctx)
    if choices(p):
        text = " \\| ".join(code(c) for c in choices(p))
    elif p.metavar and p.metavar != "<choice>" and kind(p) == "option":  # an argument's metavar is its name
        text = code(p.metavar)
    else:
        bare = name.replace(" range", "").lower()
        text = escape(_TYPES.get(bare, bare))
    if lo is not None or hi is not None:
        text += ", " + ("" if lo is None else f"{lo} ≤ ") + "value" + ("" if hi is None else f" ≤ {hi}")
    if p.multiple:
        text += ", repeatable"
    elif p.nargs == -1:
        text += ", one or more"
    return text


def default_text(p: Any) -> str:
    if p.required:
        return "required"
    show = getattr(p, "show_default", None)
    if isinstance(show, str):
        return escape(show)
    d = p.default
    if callable(d):
        return "computed"
    if d is None or d == () or d == []:
        return "—"
    if isinstance(d, bool):
        if kind(p) == "option" and p.secondary_opts:
            return code(p.opts[0] if d else p.secondary_opts[0])
        return code(str(d).lower())
    if isinstance(d, (list, tuple)):
        return ", ".join(code(_plain(x)) for x in d)
    return code(_plain(d))


def text_of(cmd: Any, text: str | None) -> str:
    """Help text as Markdown: typer's rich markup made plain, its Markdown kept, plain text escaped."""
    text = inspect.cleandoc(text or "").split("\f")[0]
    mode = getattr(cmd, "rich_markup_mode", None)
    if mode == "rich":
        from rich.text import Text
        return escape(Text.from_markup(text).plain)
    if mode == "markdown":
        return " ".join(text.split())
    return escape(text)


def help_text(cmd: Any, p: Any) -> str:
    text = text_of(cmd, getattr(p, "help", None))
    dep = getattr(p, "deprecated", False)
    if old_spelling(p):
        new = p.help.split(" -> ", 1)[1].split("' or '")  # cli._deprecated's "A' or 'B"
        text = f"**Deprecated**: use {' or '.join(code(n) for n in new)}."
    elif dep:
        text = f"**Deprecated**{': ' + escape(dep) if isinstance(dep, str) else '.'} {text}".strip()
    if p.envvar:
        envs = [p.envvar] if isinstance(p.envvar, str) else list(p.envvar)
        text += " Environment: " + ", ".join(code(e) for e in envs) + "."
    return text


def option_names(p: Any) -> str:
    if old_spelling(p):  # the spelling a user typed (it may reach the command under another name)
        return code(p.help[len("Deprecated:"):].split(" -> ", 1)[0].strip())
    names = ", ".join(code(o) for o in p.opts)
    return names + (" / " + ", ".join(code(o) for o in p.secondary_opts) if p.secondary_opts else "")


def argument_name(p: Any) -> str:
    return getattr(p, "human_readable_name", None) or p.metavar or p.name.upper()


def params_md(cmd: Any, ctx: Any) -> str:
    args = [p for p in cmd.params if kind(p) == "argument" and shown(p)]
    opts = [p for p in cmd.params if kind(p) == "option" and shown(p)]
    out = []
    if args:
        rows = [[code(argument_name(p)), value_text(p, ctx), default_text(p), help_text(cmd, p)] for p in args]
        out.append("**Arguments**\n\n" + table(["Argument", "Takes", "Default", "Description"], rows))
    panels: dict[str, list[Any]] = {}
    for p in opts:
        panels.setdefault(getattr(p, "rich_help_panel", None) or "Options", []).append(p)
    for panel, ps in sorted(panels.items(), key=lambda kv: kv[0] != "Options"):
        rows = [[option_names(p), value_text(p, ctx), default_text(p), help_text(cmd, p)] for p in ps]
        out.append(f"**{escape(panel)}**\n\n" + table(["Option", "Takes", "Default", "Description"], rows))
    return "\n".join(out)


def command_md(ctx: Any, cmd: Any, level: int) -> str:
    path = ctx.command_path
    usage = " ".join([path, *cmd.collect_usage_pieces(ctx)])
    out = [f"{'#' * level} {path}\n"]
    if getattr(cmd, "deprecated", False):
        out.append("**Deprecated.**\n")
    out += [text_of(cmd, par) + "\n" for par in inspect.cleandoc(cmd.help or "").split("\n\n") if par.strip()]
    out.append(f"```text\n{usage}\n```\n")
    if is_group(cmd):
        rows = [[f"[{code(c.info_name)}](#{anchor(c.command_path)})", text_of(s, s.get_short_help_str(limit=120)),
                 escape(getattr(s, "rich_help_panel", None) or "")]
                for c, s in walk(cmd, ctx)[1:] if c.parent is ctx]
        if not any(r[2] for r in rows):
            rows = [r[:2] for r in rows]
        out.append(table(["Command", "What it does", "Group"][:len(rows[0]) if rows else 2], rows))
    out.append(params_md(cmd, ctx))
    return "\n".join(out)


def render(app: Any, prog: str = "cifar4") -> str:
    """The page for a typer app (or a command tree typer or click already built)."""
    import typer
    root = app if hasattr(app, "params") else typer.main.get_command(app)
    ctx = root.context_class(root, info_name=prog)
    parts = ["# Command line\n",
             f"Every command of `{prog}`, generated from its code when the site is built. "
             f"Each command also takes `--help`, which prints the same text in the terminal; "
             f"an option shown as `—` takes the experiment's or the command's own value when left out.\n"]
    for c, cmd in walk(root, ctx):
        parts.append(command_md(c, cmd, min(max(2, len(c.command_path.split())), 4)))
    return "\n".join(parts)


def main() -> str:
    from cifar4.cli import app
    return render(app)
