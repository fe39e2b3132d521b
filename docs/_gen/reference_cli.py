"""reference/cli.md: every command, subcommand, argument and option of `cifar4`, walked from
the click tree that typer builds from src/cifar4/cli.py, so a command or flag added there
appears on the page without editing it. Hidden options are left out unless they are
deprecated spellings, which are listed as such."""

from __future__ import annotations

import inspect
from typing import Any

import click
from md import anchor, code, escape, table


def walk(cmd: click.Command, ctx: click.Context) -> list[tuple[click.Context, click.Command]]:
    """The command and its visible subcommands, depth first, each with its context."""
    out = [(ctx, cmd)]
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                out += walk(sub, click.Context(sub, info_name=name, parent=ctx))
    return out


def shown(p: click.Parameter) -> bool:
    return not getattr(p, "hidden", False) or bool(getattr(p, "deprecated", False))


def _choice(c: Any) -> str:
    return str(getattr(c, "value", c))


def value_text(p: click.Parameter) -> str:
    """What the parameter takes: a flag, its choices, its metavar, or its type and range."""
    if isinstance(p, click.Option) and p.is_flag:
        return "flag"
    info = p.type.to_info_dict()
    if isinstance(p.type, click.Choice):
        text = " \\| ".join(code(_choice(c)) for c in p.type.choices)
    elif p.metavar:
        text = code(p.metavar)
    else:
        text = escape(str(info.get("name", p.type.name)).replace(" range", "").lower())
    lo, hi = info.get("min"), info.get("max")
    if lo is not None or hi is not None:
        lo_s = "" if lo is None else f"{lo} {'<' if info.get('min_open') else '≤'} "
        hi_s = "" if hi is None else f" {'<' if info.get('max_open') else '≤'} {hi}"
        text += f", {lo_s}value{hi_s}"
    if p.multiple or (p.nargs != 1 and isinstance(p, click.Option)):
        text += ", repeatable"
    elif p.nargs == -1:
        text += ", one or more"
    return text


def default_text(p: click.Parameter) -> str:
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
        flag = isinstance(p, click.Option) and p.secondary_opts
        return code(p.opts[0] if d else p.secondary_opts[0]) if flag else code(str(d).lower())
    if isinstance(d, (list, tuple)):
        return ", ".join(code(_choice(x)) for x in d)
    return code(_choice(d))


def help_text(p: click.Parameter) -> str:
    text = escape(inspect.cleandoc(getattr(p, "help", None) or ""))
    dep = getattr(p, "deprecated", False)
    if dep:
        text = f"**Deprecated**{': ' + escape(dep) if isinstance(dep, str) else '.'} {text}".strip()
    if p.envvar:
        envs = [p.envvar] if isinstance(p.envvar, str) else list(p.envvar)
        text += " Environment: " + ", ".join(code(e) for e in envs) + "."
    return text


def option_names(p: click.Option) -> str:
    names = ", ".join(code(o) for o in p.opts)
    return names + (" / " + ", ".join(code(o) for o in p.secondary_opts) if p.secondary_opts else "")


def params_md(cmd: click.Command) -> str:
    args = [p for p in cmd.params if isinstance(p, click.Argument) and shown(p)]
    opts = [p for p in cmd.params if isinstance(p, click.Option) and shown(p)]
    out = []
    if args:
        rows = [[code(p.human_readable_name), value_text(p), default_text(p), help_text(p)] for p in args]
        out.append("**Arguments**\n\n" + table(["Argument", "Takes", "Default", "Description"], rows))
    panels: dict[str, list[click.Option]] = {}
    for p in opts:
        panels.setdefault(getattr(p, "rich_help_panel", None) or "Options", []).append(p)
    for panel, ps in sorted(panels.items(), key=lambda kv: kv[0] != "Options"):
        rows = [[option_names(p), value_text(p), default_text(p), help_text(p)] for p in ps]
        out.append(f"**{escape(panel)}**\n\n" + table(["Option", "Takes", "Default", "Description"], rows))
    return "\n".join(out)


def command_md(ctx: click.Context, cmd: click.Command, level: int) -> str:
    path = ctx.command_path
    usage = " ".join([path, *cmd.collect_usage_pieces(ctx)])
    out = [f"{'#' * level} {path}\n"]
    if getattr(cmd, "deprecated", False):
        out.append("**Deprecated.**\n")
    helps = inspect.cleandoc(cmd.help or "").split("\f")[0]
    out += [escape(par) + "\n" for par in helps.split("\n\n") if par.strip()]
    out.append(f"```text\n{usage}\n```\n")
    if isinstance(cmd, click.Group):
        subs = [(c, s) for c, s in walk(cmd, ctx)[1:] if c.parent is ctx]
        rows = [[f"[{code(c.info_name)}](#{anchor(c.command_path)})", escape(s.get_short_help_str(limit=120))]
                for c, s in subs]
        out.append(table(["Command", "What it does"], rows))
    out.append(params_md(cmd))
    return "\n".join(out)


def render(app: Any, prog: str = "cifar4") -> str:
    """The page for a typer app (or a click command)."""
    import typer
    root = app if isinstance(app, click.Command) else typer.main.get_command(app)
    ctx = click.Context(root, info_name=prog)
    parts = ["# Command line\n",
             f"Every command of `{prog}`, generated from its code when the site is built. "
             f"Each command also takes `--help`, which prints the same text in the terminal; "
             f"an option shown as `—` takes the experiment's or the command's own value when left out.\n"]
    for c, cmd in walk(root, ctx):
        level = min(2 + len(c.command_path.split()) - 2, 4) if c.parent else 2
        parts.append(command_md(c, cmd, level))
    return "\n".join(parts)


def main() -> str:
    from cifar4.cli import app
    return render(app)
