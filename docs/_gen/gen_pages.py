"""The generated pages of the documentation site, run by mkdocs-gen-files at every build: the
reference pages from the code, and the course's notebook as the tutorial's notebook page (copied
into the build's virtual docs tree, so git holds it once, under notebooks/)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import md  # noqa: E402  (puts the checkout's src/ first on the path)
import mkdocs_gen_files  # noqa: E402
import reference_cli  # noqa: E402
import reference_http  # noqa: E402
import reference_presets  # noqa: E402
import reference_python  # noqa: E402
import reference_run_directory  # noqa: E402
import reference_schema  # noqa: E402

PAGES = {  # page -> its generator (each has main() -> Markdown)
    "reference/cli.md": reference_cli,
    "reference/experiment-schema.md": reference_schema,
    "reference/presets.md": reference_presets,
    "reference/run-directory.md": reference_run_directory,
    "reference/http-api.md": reference_http,
    "reference/python-api.md": reference_python,
}
NOTEBOOK = md.ROOT / "notebooks" / "practical_session.ipynb"

for page, module in PAGES.items():
    with mkdocs_gen_files.open(page, "w") as f:
        f.write(module.main())

with mkdocs_gen_files.open("tutorial/notebook.ipynb", "wb") as f:
    f.write(NOTEBOOK.read_bytes())
