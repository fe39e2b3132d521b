"""The documentation site: its reference pages are generated from the code (every command,
option, schema key, preset, route and record file appears without editing a page), the site
builds strictly, and a reader in a real Chromium gets from the home page to a generated page."""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import threading
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import BaseModel, Field

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "_gen"))

import reference_cli  # noqa: E402
import reference_presets  # noqa: E402
import reference_run_directory  # noqa: E402
import reference_schema  # noqa: E402

from cifar4 import config  # noqa: E402
from cifar4.cli import app  # noqa: E402


def sections(page: str) -> dict[str, str]:
    """Heading text -> the Markdown under it, up to the next heading."""
    out: dict[str, str] = {}
    title = ""
    for line in page.splitlines():
        if line.startswith("#") and not line.startswith("#!"):
            title = line.lstrip("#").strip()
            out[title] = ""
        else:
            out[title] = out.get(title, "") + line + "\n"
    return out


def commands(cmd, path: str) -> list[tuple[str, Any]]:
    """Every visible command of the tree typer built, from its `commands` tables (not the page's walker)."""
    out = [(path, cmd)]
    for name, sub in getattr(cmd, "commands", {}).items():
        if not sub.hidden:
            out += commands(sub, f"{path} {name}")
    return out


def choices_of(p) -> list[str]:
    desc = getattr(p, "type_descriptor", None)  # typer >= 0.29 (its own click) keeps choices there
    values = (desc.choices if desc.is_choice else ()) if desc is not None else getattr(p.type, "choices", ())
    return [str(getattr(c, "value", c)) for c in values or ()]


def test_the_cli_page_has_every_command_with_every_option_and_choice():
    page = sections(reference_cli.render(app))
    every = commands(typer.main.get_command(app), "cifar4")
    assert len(every) > 10 and "cifar4 data fetch" in dict(every)
    for path, cmd in every:
        assert path in page, f"no section for '{path}'"
        body = page[path]
        for p in cmd.params:
            if getattr(p, "hidden", False) and not getattr(p, "deprecated", False):
                continue
            names = [*p.opts, *p.secondary_opts] if p.param_type_name == "option" else [p.metavar or p.name.upper()]
            for n in names:
                assert f"`{n}`" in body, f"'{path}' lacks {n}"
            for c in choices_of(p):
                assert f"`{c}`" in body, f"'{path}' lacks choice {c} of {names[0]}"


class Color(StrEnum):
    red = "red"
    blue = "blue"


def test_the_cli_page_walks_any_typer_app_and_leaves_hidden_options_out():
    tool, things = typer.Typer(), typer.Typer(help="Look after things.")
    tool.add_typer(things, name="things")

    @tool.command()
    def go(run: str = typer.Argument(..., help="Where to."),
           color: Color = typer.Option(Color.red, "--color", help="Pick | one."),
           secret: bool = typer.Option(False, "--secret", hidden=True, help="Not for users.")) -> None:
        """Go somewhere."""

    @tool.command(deprecated=True)
    def old() -> None:
        """The old way."""

    @things.command("count")
    def count(n: int = typer.Option(3, "--n", min=1, max=9, help="How many.")) -> None:
        """Count things."""

    page = sections(reference_cli.render(tool, prog="tool"))
    body = page["tool go"]
    assert "`--color`" in body and "`red` \\| `blue`" in body and "Pick \\| one." in body and "`RUN`" in body
    assert "--secret" not in body
    assert "**Deprecated.**" in page["tool old"]
    assert "`--n`" in page["tool things count"] and "1 ≤ value ≤ 9" in page["tool things count"]


def test_the_schema_page_has_every_section_and_key():
    page = sections(reference_schema.render(config.Experiment))
    for title, model in (("Top level", config.Experiment), ("[train]", config.TrainConfig),
                         ("[train.early_stopping]", config.EarlyStoppingConfig), ("[augment]", config.AugmentConfig),
                         ("[data]", config.DataConfig), ("[model]", config.ModelConfig),
                         ("[sweep.*]", config.SweepParam), ("[ensemble]", config.EnsembleConfig)):
        for name, f in model.model_fields.items():
            assert f"`{f.alias or name}`" in page[title], f"{title} lacks {name}"
    assert "≤ 100000" in page["[train]"]  # bounds come from the schema's constraints


def test_the_presets_page_has_every_builtin_experiment_with_its_description():
    page = sections(reference_presets.main())
    for name in config.builtin_names():
        d = config.load_dict(name)[0]
        assert name in page, f"no section for preset '{name}'"
        assert f"--preset {name}" in page[name]
        if "train" in d and "epochs" in d["train"]:
            assert f"| `train.epochs` | `{d['train']['epochs']}` |" in page[name]


class _Split(BaseModel):
    """How the images were divided."""

    kind: str = Field(description="session, stratified or official")


class _Metrics(BaseModel):
    """What a finished run measured."""

    test_accuracy: float = Field(description="accuracy on the held-out test split")
    split: _Split
    per_class_accuracy: dict[str, float] = Field(default_factory=dict, description="test accuracy per class")


def test_the_run_directory_page_lists_every_record_file_and_key():
    page = sections(reference_run_directory.render({"metrics.json": _Metrics}, ("metrics.json", "curves.png")))
    body = page["metrics.json"]
    assert "`test_accuracy`" in body and "accuracy on the held-out test split" in body
    assert "`per_class_accuracy`" in body and "[metrics.json: split](#metricsjson-split)" in body
    assert "`kind`" in page["metrics.json: split"]
    assert "`curves.png`" in page["Run directory"]


def test_the_run_directory_page_of_this_code_names_every_file():
    from cifar4 import runs
    page = reference_run_directory.main()
    for f in runs.RUN_FILES:
        assert f"`{f}`" in page
    try:
        from cifar4.record import RECORD_FILES
    except ImportError:
        return
    got = sections(page)
    for name, model in RECORD_FILES.items():
        if model is config.Experiment:  # config.toml: its keys are the experiment schema's page
            assert "(experiment-schema.md)" in got[name]
            continue
        for key, f in model.model_fields.items():
            assert f"`{f.alias or key}`" in got[name], f"{name} lacks {key}"


def test_the_http_page_has_every_route():
    pytest.importorskip("fastapi")
    import reference_http

    from cifar4.serving.server import create_app
    spec = create_app(search=()).openapi()
    page = sections(reference_http.render(spec))
    for path, item in spec["paths"].items():
        for method in item:
            assert f"{method.upper()} {path}" in page


# ---------------------------------------------------------------- the built site in a browser

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    for extra in ("mkdocs", "material", "mkdocs_gen_files", "mkdocstrings", "mkdocs_jupyter", "fastapi"):
        pytest.importorskip(extra, reason="the documentation site needs the 'docs' extra")
    out = tmp_path_factory.mktemp("site")
    env = {**__import__("os").environ, "DISABLE_MKDOCS_2_WARNING": "true", "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stderr[-4000:]}"
    return out


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served_site(site):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    thread.join(timeout=10)


def test_the_site_builds_with_every_page_of_the_nav(site):
    for page in ("reference/cli", "reference/experiment-schema", "reference/presets", "reference/run-directory",
                 "reference/http-api", "reference/python-api", "tutorial/notebook"):
        assert (site / page / "index.html").is_file(), page
    api = (site / "reference/python-api/index.html").read_text(encoding="utf-8")
    import cifar4
    for name in cifar4.__all__:
        assert f"cifar4.{name}" in api, f"the Python API page lacks cifar4.{name}"
    assert not (ROOT / ".cache" / "mkdocs-jupyter").exists()  # the build leaves no cache in the checkout


def test_a_reader_goes_from_the_home_page_to_the_generated_reference(served_site, tmp_path):
    pw = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no chromium on the PATH (apt-get install -y chromium)")
    root = typer.main.get_command(app)
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        page.goto(served_site)
        page.locator(".md-tabs").get_by_role("link", name="Reference").click()
        page.locator(".md-sidebar--primary").get_by_role("link", name="Command line", exact=True).click()
        page.wait_for_url("**/reference/cli/", wait_until="load")  # the whole page, not only its first headings
        headings = {h.rstrip("¶").strip() for h in page.locator("article h2, article h3").all_inner_texts()}
        for path, _ in commands(root, "cifar4"):
            assert path in headings, f"the CLI page shows no '{path}'"
        page.screenshot(path=str(tmp_path / "cli.png"))
        page.locator(".md-sidebar--primary").get_by_role("link", name="Experiment schema").click()
        page.wait_for_url("**/reference/experiment-schema/", wait_until="load")
        keys = set(page.locator("article td code").all_inner_texts())
        for name in config.TrainConfig.model_fields:
            assert name in keys, f"the schema page shows no train.{name}"
        browser.close()
    assert (tmp_path / "cli.png").stat().st_size > 10_000
