"""The documentation: README.md and the pages under docs/.

- Every ```python block runs: the blocks of one page in order, as one script (a fresh namespace
  per page), in an empty temporary folder. A block that needs what a test cannot have (a
  download, a photo on disk) carries ``<!-- not-run: reason -->`` on the line above its fence;
  it is still compiled, and is reported as skipped with that reason. Blocks in any other
  language (bash, text, unlabelled) are never run.
- The site builds with ``mkdocs build --strict`` (broken links and anchors, a page outside the
  navigation, a docstring mkdocstrings cannot read: errors), and the API page lists every name of
  ``mammut.__all__``.
- The README's relative links point at files that exist, and its ``make demo`` table is the one on
  the getting-started page.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.*?)\s*-->\s*$")
FENCE_OPEN = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
RUN_LANGUAGES = {"python", "py"}
# pages whose blocks build models at the seed README's sizes (tens of seconds on 2 CPU cores)
SLOW_PAGES = {"README.md", "docs/models.md"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    not_run: str | None  # the reason, for a block marked <!-- not-run: reason -->

    @property
    def runs(self) -> bool:
        return self.language in RUN_LANGUAGES and self.not_run is None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT).as_posix()}:{self.line}"


def code_blocks(text: str, page: Path = ROOT / "page.md") -> list[Block]:
    """Every fenced code block of a Markdown text, with its language and not-run mark."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE_OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = next((j for j in range(i + 1, len(lines)) if close.match(lines[j])), len(lines))
        body = [re.sub(rf"^ {{0,{indent}}}", "", ln) for ln in lines[i + 1:end]]  # the fence's indent off
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = NOT_RUN.match(prev.strip())
        blocks.append(Block(page, i + 1, m["info"].lower(), "\n".join(body) + "\n", mark[1] if mark else None))
        i = end + 1
    return blocks


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _compile(block: Block):
    # padded so that a traceback names the block's real line in the page
    return compile("\n" * block.line + block.code, str(block.page), "exec")


BLOCKS = {page: code_blocks(page.read_text(encoding="utf-8"), page) for page in PAGES}
RUN_PAGES = [
    pytest.param(page, id=_rel(page), marks=[pytest.mark.slow] if _rel(page) in SLOW_PAGES else [])
    for page, blocks in BLOCKS.items() if any(b.runs for b in blocks)
]
NOT_RUN_BLOCKS = [pytest.param(b, id=b.where) for blocks in BLOCKS.values() for b in blocks if b.not_run is not None]


# ---------------------------------------------------------------------------- the extractor
def test_only_python_blocks_run_and_marks_are_read():
    text = "\n".join([
        "```bash", "make demo", "```",
        "```", "no language", "```",
        "```text", "filepath,title", "```",
        "```python", "x = 1", "```",
        "",
        "<!-- not-run: needs cat.jpg -->",
        "```python", "open('cat.jpg')", "```",
        "~~~py", "y = x + 1", "~~~",
        "    indented = 'not fenced, not run'",
        "````python", "s = '''", "```", "'''", "````",
    ])
    blocks = code_blocks(text)
    assert [(b.language, b.runs) for b in blocks] == [
        ("bash", False), ("", False), ("text", False), ("python", True), ("python", False), ("py", True), ("python", True)]
    assert blocks[4].not_run == "needs cat.jpg" and blocks[4].line == 15
    assert [b.code for b in blocks if b.runs] == ["x = 1\n", "y = x + 1\n", "s = '''\n```\n'''\n"]


def test_bash_blocks_of_the_readme_are_not_run():
    first = BLOCKS[ROOT / "README.md"][0]
    assert first.language == "bash" and "make demo" in first.code and "make test" in first.code
    assert not first.runs
    for blocks in BLOCKS.values():
        for b in blocks:
            assert b.runs == (b.language in RUN_LANGUAGES and b.not_run is None), b.where


def test_every_not_run_mark_sits_on_a_python_block():
    """A mark is a comment on the line right above a python fence, with a reason; nothing else."""
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        marked = {b.line - 1 for b in BLOCKS[page] if b.not_run is not None}
        for n, line in enumerate(lines, 1):
            if "not-run" in line and line.lstrip().startswith("<!--"):
                assert NOT_RUN.match(line.strip()), f"{_rel(page)}:{n}: write <!-- not-run: reason -->"
                assert NOT_RUN.match(line.strip())[1], f"{_rel(page)}:{n}: a not-run mark needs its reason"
                assert n in marked and lines[n].startswith("```python"), \
                    f"{_rel(page)}:{n}: a not-run mark goes on the line right above a ```python fence"


# ---------------------------------------------------------------------------- the blocks
@pytest.mark.parametrize("page", RUN_PAGES)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    """The runnable blocks of one page, in order, as one script, in an empty folder."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"__name__": "__main__"}
    for block in BLOCKS[page]:
        if block.runs:
            exec(_compile(block), namespace)  # noqa: S102 - the documentation's own code


@pytest.mark.parametrize("block", NOT_RUN_BLOCKS)
def test_not_run_blocks(block):
    """Marked blocks are still valid Python; the skip names the block and the reason."""
    _compile(block)
    pytest.skip(f"{block.where} not run: {block.not_run}")


def test_not_run_marks_stay_rare():
    runnable = sum(b.runs for blocks in BLOCKS.values() for b in blocks)
    assert len(NOT_RUN_BLOCKS) <= 4 and runnable >= 4 * len(NOT_RUN_BLOCKS), \
        f"{len(NOT_RUN_BLOCKS)} not-run blocks against {runnable} that run: make blocks runnable instead"


# ---------------------------------------------------------------------------- the site
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def test_site_builds_strict(tmp_path):
    missing = [m for m in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python") if not _installed(m)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: pip install -e '.[docs]' (part of the dev extra)")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("mammut.MaMMUT", "mammut.load", "mammut.GenerationConfig", "mammut.save_pretrained"):
        assert f'id="{name}"' in api, f"{name}: no entry in the built API reference"
    for page in sorted(DOCS.glob("*.md")):
        built = site / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
        assert built.is_file(), f"{_rel(page)}: not built"


def test_api_page_lists_the_public_api():
    import mammut

    listed = set(re.findall(r"^::: mammut\.(\w+)\s*$", (DOCS / "api.md").read_text(encoding="utf-8"), re.M))
    missing = sorted(set(mammut.__all__) - listed)
    assert not missing, f"docs/api.md: add '::: mammut.NAME' for {missing}"
    unknown = sorted(listed - set(mammut.__all__))
    assert not unknown, f"docs/api.md lists names outside mammut.__all__: {unknown}"


# ---------------------------------------------------------------------------- the README
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _github_slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_links_resolve():
    """mkdocs checks the pages' links; the README is outside the site, so it is checked here
    (files, and anchors by GitHub's rule for heading ids)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = LINK.findall(readme)
    assert any(t.startswith("docs/") for t in targets), "README.md: no link to the docs"
    for target in targets:
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else ROOT / "README.md"
        assert file.exists(), f"README.md links to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", file.read_text(encoding="utf-8"), re.M)
            assert anchor in {_github_slug(h) for h in headings}, f"README.md links to {target}: no such heading"


def _demo_table(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| held-out metric"))
    end = next(i for i in range(start, len(lines) + 1) if i == len(lines) or not lines[i].startswith("|"))
    return lines[start:end]


def test_readme_demo_table_is_the_getting_started_one():
    """The README shows `make demo`'s table; docs/getting-started.md has it with its notes.
    When the demo is measured again, update both."""
    readme = _demo_table((ROOT / "README.md").read_text(encoding="utf-8"))
    docs = _demo_table((DOCS / "getting-started.md").read_text(encoding="utf-8"))
    assert readme == docs
