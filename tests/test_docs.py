"""The documentation site: every snippet include is expanded, nothing is loaded from
the network, math typesets offline, and the Getting started scripts run."""

import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from compile_flags import subprocess_env

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SNIPPET_DIRS = (DOCS / "snippets", REPO)  # mkdocs.yml: pymdownx.snippets base_path
# Any spelling of the snippet marker, including ruff's `--8 < --"x.py"`.
MARKER = re.compile(r"--8\s*<\s*--")
INCLUDE = re.compile(r'--8<-- "(?P<path>[^":]+)(?::(?P<section>[\w-]+))?"')
MKDOCS_BUILD = (sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet")
HEADLESS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--virtual-time-budget=10000",
)
NETWORK = re.compile(r"^\s*(https?:)?//", re.IGNORECASE)


def _pages():
    return sorted(p for p in DOCS.rglob("*.md") if "snippets" not in p.parts)


def _include_lines(page: Path):
    """(line number, stripped line) of every line of ``page`` with a snippet marker."""
    lines = page.read_text().splitlines()
    return [(i + 1, s.strip()) for i, s in enumerate(lines) if MARKER.search(s)]


def _snippet_file(path: str) -> Path | None:
    for base in SNIPPET_DIRS:
        if (base / path).is_file():
            return base / path
    return None


def _snippet_text(path: str, section: str | None) -> str:
    text = _snippet_file(path).read_text()
    if section is None:
        return text
    start = f"--8<-- [start:{section}]"
    end = f"--8<-- [end:{section}]"
    return text.split(start, 1)[1].split("\n", 1)[1].split(end, 1)[0]


def _built_page(site: Path, page: Path) -> Path:
    rel = page.relative_to(DOCS).with_suffix("")
    return site / "index.html" if rel.name == "index" else site / rel / "index.html"


class _Page(HTMLParser):
    """The text of a page, and its tags with their attributes."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def _normalise(text: str) -> str:
    return " ".join(html.unescape(text).split())


# --------------------------------------------------------------------- sources
def test_snippet_includes_are_well_formed():
    """Every include in the Markdown is `--8<-- "file"` (or `"file:section"`), and the
    file (and section) exists: ruff format once turned them into `--8 < --"file"`."""
    found = 0
    for page in _pages():
        for number, line in _include_lines(page):
            where = f"{page.relative_to(REPO)}:{number}"
            match = INCLUDE.fullmatch(line)
            assert match, (
                f'{where}: malformed snippet include {line!r}; write --8<-- "x.py"'
            )
            assert _snippet_file(match["path"]), f"{where}: no file {match['path']!r}"
            if match["section"]:
                assert _snippet_text(match["path"], match["section"]).strip(), where
            found += 1
    assert found >= 4  # home, two guides, Getting started


def test_pages_hold_no_control_characters():
    """No page holds a control character other than a newline: a backslash escape
    lost in a Python string once turned the solvers guide's ``\\frac`` and
    ``\\text`` into a form feed and a tab, and the formula into garbage."""
    for page in [*_pages(), REPO / "README.md"]:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            bad = [c for c in line if ord(c) < 32]
            assert not bad, f"{page.relative_to(REPO)}:{number}: control {bad[0]!r}"


def test_ruff_format_leaves_markdown_alone():
    """Markdown is excluded from ruff format, even when a file is named explicitly."""
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    pages = [str(p.relative_to(REPO)) for p in _pages()]
    result = subprocess.run(
        [ruff, "format", "--check", *pages],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ built site
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [*MKDOCS_BUILD, "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.slow
def test_built_pages_show_their_examples(site):
    """No page shows a snippet marker, and every included file (or section) appears
    in its page: its longest line, as text."""
    html_pages = sorted(site.rglob("*.html"))
    assert len(html_pages) > 10
    for path in html_pages:
        text = _normalise("".join(_parse(path).text))
        hit = MARKER.search(text)
        assert hit is None, (
            f"{path.relative_to(site)}: unexpanded snippet include "
            f"{text[max(hit.start() - 40, 0) : hit.end() + 40]!r}"
        )
    for page in _pages():
        includes = [INCLUDE.fullmatch(line) for _, line in _include_lines(page)]
        if not includes:
            continue
        text = _normalise("".join(_parse(_built_page(site, page)).text))
        for match in includes:
            snippet = _snippet_text(match["path"], match["section"])
            longest = max(snippet.splitlines(), key=len)
            assert _normalise(longest) in text, (
                f"{page.relative_to(REPO)}: {match['path']} not shown "
                f"(missing {longest.strip()!r})"
            )


@pytest.mark.slow
def test_built_pages_load_nothing_from_the_network(site):
    """Scripts, stylesheets, fonts, icons and images come from the site itself, and
    each one is there: the docs read the same offline."""
    attributes = {
        "script": "src",
        "link": "href",
        "img": "src",
        "iframe": "src",
        "source": "src",
        "audio": "src",
        "video": "src",
        "embed": "src",
        "object": "data",
    }
    for path in sorted(site.rglob("*.html")):
        page = _parse(path)
        for tag, attrs in page.tags:
            url = attrs.get(attributes.get(tag, ""), "")
            if not url:
                continue
            where = f"{path.relative_to(site)}: <{tag}> {url}"
            assert not NETWORK.match(url), f"{where} loads from the network"
            if url.startswith(("data:", "#")):
                continue
            target = url.split("#")[0].split("?")[0]
            # Root-relative paths only on 404.html, which a server sends from the root.
            base = site if target.startswith("/") else path.parent
            local = (base / target.lstrip("/")).resolve()
            if local.is_dir():  # <link rel="next" href="../x/">: a page
                local = local / "index.html"
            assert local.is_file(), f"{where} is not in the built site"
        inline_css = "".join(a.get("style", "") for _, a in page.tags)
        for css in (inline_css, path.read_text()):
            assert not re.search(r"(url\(|@import)\s*['\"]?\s*(https?:)?//", css), path
    for path in sorted(site.rglob("*.css")):
        css = path.read_text()
        hit = re.search(r"(url\(|@import)\s*['\"]?\s*(https?:)?//[^)'\"]*", css)
        assert hit is None, f"{path.relative_to(site)}: {hit[0]}"


@pytest.mark.slow
def test_math_pages_load_the_shipped_mathjax(site):
    """Every page with math loads MathJax from the site, and its fonts are there."""
    fonts = site / "javascripts/mathjax/output/chtml/fonts/woff-v2"
    assert (fonts / "MathJax_Main-Regular.woff").is_file()
    assert (fonts / "MathJax_Math-Italic.woff").is_file()
    with_math = 0
    for path in sorted(site.rglob("*.html")):
        page = _parse(path)
        if not any("arithmatex" in a.get("class", "") for _, a in page.tags):
            continue
        with_math += 1
        scripts = [a["src"] for t, a in page.tags if t == "script" and a.get("src")]
        mathjax = [s for s in scripts if s.endswith("javascripts/mathjax/tex-chtml.js")]
        assert mathjax, f"{path.relative_to(site)} has math but does not load MathJax"
        assert (path.parent / mathjax[0]).resolve().is_file()
    assert with_math >= 3


_CHECK_MATH = """<script>
MathJax.startup.promise.then(() => document.fonts.ready).then(() => {
  const glyph = document.querySelector("mjx-c");
  const out = document.createElement("pre");
  out.id = "math-check";
  out.textContent = JSON.stringify({
    typeset: document.querySelectorAll("mjx-container").length,
    untypeset: [...document.querySelectorAll(".arithmatex")].filter(
      (e) => !e.querySelector("mjx-container")).length,
    glyph: glyph ? getComputedStyle(glyph, "::before").content : null,
    fonts: [...document.fonts].filter((f) => f.family.startsWith("MJXTEX")
      && f.status === "loaded").length,
  });
  document.body.appendChild(out);
});
</script></body>"""


@pytest.mark.slow
def test_math_typesets_offline_in_a_browser(site):
    """In headless Chromium, from file:// (no server, no network), every formula of
    the Gauss-Newton guide becomes MathJax output drawn with the shipped fonts."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed")
    guide = site / "guide/gauss-newton/index.html"
    probe = guide.with_name("math-check.html")
    probe.write_text(guide.read_text().replace("</body>", _CHECK_MATH, 1))
    result = subprocess.run(
        [browser, *HEADLESS, "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="math-check">(.*?)</pre>', result.stdout)
    assert found, "MathJax did not finish: " + result.stderr[-2000:]
    check = json.loads(html.unescape(found[1]))
    assert check["typeset"] >= 10 and check["untypeset"] == 0, check
    # The glyphs carry their characters (blank math otherwise) in MathJax's fonts.
    assert check["glyph"] not in (None, "none", "normal", '""'), check
    assert check["fonts"] >= 1, check


# ------------------------------------------------------- Getting started scripts
def _run_script(name: str) -> tuple[float, float, str]:
    result = subprocess.run(
        [sys.executable, str(DOCS / "snippets" / name)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    found = re.search(r"held-out loss (\S+) -> (\S+)\s*$", result.stdout)
    assert found, result.stdout[-2000:]
    return float(found[1]), float(found[2]), result.stdout


def test_getting_started_script_trains():
    """The Getting started script runs as written and GN cuts the held-out loss of a
    fresh MLP by far more than noise (about 1.4 to under 0.1 in twenty steps)."""
    before, after, out = _run_script("getting_started.py")
    assert before > 1.0
    assert after < 0.25 * before, out
    assert "rejected True" not in out, out


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "getting_started_batchnorm.py",
        "getting_started_dropout.py",
        "getting_started_frozen.py",
        "optax_loop.py",
    ],
)
def test_getting_started_patterns_train(name):
    """The stateful, dropout, frozen-parameter and optax-loop patterns run as
    written and train."""
    before, after, out = _run_script(name)
    assert after < 0.8 * before, out


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["quickstart.py", "gauss_newton_check.py", "lm_quickstart.py", "curvature.py"],
)
def test_other_included_snippets_run(name):
    """The home page's and the guides' examples run as written (the GN check asserts
    against plain JAX itself); the printed training losses go down."""
    result = subprocess.run(
        [sys.executable, str(DOCS / "snippets" / name)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    losses = re.findall(r"^\d+ (\S+) (?:-> )?(\S+)$", result.stdout, re.MULTILINE)
    if losses:
        assert float(losses[-1][1]) < float(losses[0][0]), result.stdout[-2000:]


def test_headings_carry_no_math_and_the_install_extras_match_the_readme():
    # A heading's TeX shows raw in the table of contents.
    for page in _pages():
        for line in page.read_text().splitlines():
            if line.startswith("#"):
                assert "$" not in line, (page.name, line)
    readme = (REPO / "README.md").read_text()
    index = (DOCS / "index.md").read_text()
    for extras in re.findall(r'pip install -e "\.\[([\w,]+)\]"', readme):
        assert f'pip install -e ".[{extras}]"' in index, extras


def test_the_readme_tour_runs_as_written():
    # Every name the tour uses is defined in it: a reader can paste it whole.
    text = (REPO / "README.md").read_text()
    tour = text.split("## A short tour", 1)[1].split("```python", 1)[1]
    code = tour.split("```", 1)[0]
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_readme_lists_the_lm_extra_and_every_module():
    # Before, the lm extra's list left out pyarrow and the Layout five modules.
    import tomllib

    readme = (REPO / "README.md").read_text()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["lm"]
    listed = readme.split("the `lm` extra adds", 1)[1].split(").", 1)[0]
    for requirement in extra:
        name = re.split(r"[<>=\[ ]", requirement, maxsplit=1)[0]
        assert name in listed, name
    layout = readme.split("## Layout", 1)[1].split("```", 2)[1]
    package = REPO / "src" / "eqx_gn"
    for module in package.rglob("_*.py"):
        if module.parent.name not in ("eqx_gn", "lm") or module.name == "__init__.py":
            continue  # the folders' own lines describe theirs
        assert module.name in layout, module.relative_to(package)
