"""The documentation stays navigable: every relative link resolves, no file cites a missing page.

Links are checked the way GitHub renders them: a relative path is resolved against the page's
folder (a leading `/` against the repository root), and `#anchor` must name a heading of the
target Markdown page (GitHub's anchor rules) or an explicit `<a id=...>` / `<a name=...>`.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The background document that never became part of the repository, and the ways code cited it
# (its file name, or its short name followed by a section, step, table or number); both built in
# pieces so that this file does not match itself.
MISSING_DOC = "SPEC" + ".md"
_CITATION = re.compile(rb"SPEC" + rb"(?:\.md\b|[ ](?:section|steps?|table|\d))")

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_INLINE_LINK = re.compile(r"\[[^\]]*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
_HTML_ANCHOR = re.compile(r"""<a\b[^>]*?\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.I)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//")


def doc_pages(root: Path) -> list[Path]:
    """The pages whose links are checked: README.md, docs/*.md and models/README.md."""
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "models/README.md"]
    return [page for page in pages if page.is_file()]


def _prose_lines(text: str) -> Iterable[tuple[int, str]]:
    """(line number, line) outside fenced code blocks; code there is not rendered as links."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and match and match.group(1)[0] == fence[0] \
                and len(match.group(1)) >= len(fence) and not line.strip(fence[0] + " \t"):
            fence = None
        elif fence is None:
            yield number, line


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: link text kept, markup and punctuation dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters and digits of any script, and _
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a link into `page` may use (headings with GitHub's -1, -2 for repeats)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    previous = ""
    for _, line in _prose_lines(page.read_text(encoding="utf-8")):
        heading: str | None = None
        atx = _ATX.match(line)
        if atx:
            heading = atx.group(2) or ""
        elif _SETEXT.match(line) and previous.strip() and not previous.lstrip().startswith("|"):
            heading = previous.strip()
        if heading is not None:
            slug = github_anchor(heading)
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
        found.update(_HTML_ANCHOR.findall(line))
        previous = line
    return found


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image in `page`'s prose."""
    found: list[tuple[int, str]] = []
    for number, line in _prose_lines(page.read_text(encoding="utf-8")):
        prose = _CODE_SPAN.sub("", line)
        targets = [*_INLINE_LINK.findall(prose), *_HTML_LINK.findall(prose)]
        definition = _REFERENCE_DEF.match(prose)
        if definition:
            targets.append(definition.group(1))
        found.extend((number, target.strip("<>")) for target in targets)
    return found


def broken_links(pages: Iterable[Path], root: Path) -> tuple[list[str], int]:
    """Every relative link of `pages` that does not resolve, and how many were checked."""
    problems: list[str] = []
    checked = 0
    for page in pages:
        name = page.relative_to(root).as_posix()
        for number, target in links(page):
            if _SCHEME.match(target):
                continue  # http(s), mailto: not this test's business
            checked += 1
            path_part, _, anchor = target.partition("#")
            path_part = unquote(path_part)
            if not path_part:
                resolved = page
            elif path_part.startswith("/"):
                resolved = (root / path_part.lstrip("/")).resolve()
            else:
                resolved = (page.parent / path_part).resolve()
            where = f"{name}:{number}: link {target!r}"
            if not resolved.is_relative_to(root.resolve()):
                problems.append(f"{where} leaves the repository")
            elif not resolved.exists():
                problems.append(f"{where}: no such file {resolved.relative_to(root.resolve())}")
            elif anchor and resolved.suffix == ".md" and unquote(anchor) not in anchors(resolved):
                problems.append(f"{where}: no heading with anchor #{anchor} in {resolved.name}")
    return problems, checked


def files_citing(root: Path, paths: Iterable[str], citation: re.Pattern[bytes]) -> list[str]:
    """The files among `paths` (relative to `root`) whose bytes match `citation`."""
    return [path for path in paths if (root / path).is_file()
            and citation.search((root / path).read_bytes())]


def repository_files(root: Path) -> list[str]:
    """Tracked files plus new ones not ignored: what the next commit would hold."""
    result = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root, capture_output=True, check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"git ls-files failed in {root}: {result.stderr.decode(errors='replace')}")
    return [name for name in result.stdout.decode().split("\0") if name]


def test_every_relative_link_in_the_docs_resolves():
    pages = doc_pages(ROOT)
    assert {"README.md", "docs/NETWORK.md", "models/README.md"} <= {
        page.relative_to(ROOT).as_posix() for page in pages
    }
    problems, checked = broken_links(pages, ROOT)
    assert problems == [], "broken links:\n" + "\n".join(problems)
    assert checked > 50  # the pages link to each other; a parser finding nothing is broken


def test_the_readme_gives_the_two_commands_and_maps_the_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make demo" in readme
    assert "make test-all" in readme  # CI runs it: the README must keep giving it
    assert len(readme.splitlines()) <= 220
    targets = {target for _, target in links(ROOT / "README.md")}
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in targets, f"the README's map lacks docs/{page.name}"


def test_no_file_cites_the_missing_background_document():
    files = repository_files(ROOT)
    assert "README.md" in files and "tests/test_docs.py" in files
    citing = files_citing(ROOT, files, _CITATION)
    assert citing == [], (
        f"these files cite {MISSING_DOC}, which the repository does not hold; link the docs/ "
        "page that states the fact instead (docs/NETWORK.md, docs/EVALUATION.md, ...): "
        + ", ".join(citing)
    )


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_the_checker_finds_broken_links_and_ignores_code(tmp_path):
    _write(tmp_path / "docs/A.md", (
        "# Page A\n\n"
        "## Server: `netvlad-server`\n\n"
        "## Notes\n\n## Notes\n\n"
        "Weight loading (full-size, 1,000 values)\n---\n\n"
        '<a id="custom"></a>\n'
        "[self](#page-a) [dup](#notes-1) [setext](#weight-loading-full-size-1000-values)\n"
        "[code heading](#server-netvlad-server) [html](#custom) [up](../README.md#top)\n"
        "[missing anchor](#nowhere) [dir](../models) [image](img.png)\n"
        "```sh\n[in a fence](missing-in-fence.md)\n```\n"
        "`[in a code span](missing-in-span.md)` [web](https://example.org/x.md)\n"
    ))
    _write(tmp_path / "README.md", (
        "# Top\n\n[a](docs/A.md) [b](docs/B.md) [anchor](docs/A.md#notes)\n"
        "[bad anchor](docs/A.md#server) [outside](../elsewhere.md)\n"
        "[ref]: docs/missing-ref.md\n"
    ))
    (tmp_path / "models").mkdir()
    _write(tmp_path / "docs/img.png", "not really a PNG")
    problems, checked = broken_links(doc_pages(tmp_path), tmp_path)
    assert checked == 15
    assert [problem.split(": ", 1)[0] for problem in problems] == [
        "README.md:3", "README.md:4", "README.md:4", "README.md:5", "docs/A.md:15",
    ]
    joined = "\n".join(problems)
    assert "'docs/B.md': no such file docs/B.md" in joined
    assert "no heading with anchor #server in A.md" in joined
    assert "'../elsewhere.md' leaves the repository" in joined
    assert "docs/missing-ref.md" in joined
    assert "no heading with anchor #nowhere in A.md" in joined
    assert "fence" not in joined and "span" not in joined


@pytest.mark.parametrize(("heading", "anchor"), [
    ("Server: `netvlad-server`", "server-netvlad-server"),
    ("Client memory on a large folder (`netvlad-client describe`)",
     "client-memory-on-a-large-folder-netvlad-client-describe"),
    ("Weight loading (full-size model, 149,002,051 float32 values)",
     "weight-loading-full-size-model-149002051-float32-values"),
    ("See [the table](#x) now", "see-the-table-now"),
    ("max_batch_size and --flags", "max_batch_size-and---flags"),
    ("Größe der Bilder", "größe-der-bilder"),
])
def test_github_anchor(heading, anchor):
    assert github_anchor(heading) == anchor


def test_files_citing_finds_every_form_of_the_citation(tmp_path):
    spec = "SPEC"
    _write(tmp_path / "a.py", f'"""See {MISSING_DOC} section 3."""\n')
    _write(tmp_path / "b.md", "See docs/NETWORK.md.\n")
    (tmp_path / "c.bin").write_bytes(b"\x00\x01" + MISSING_DOC.encode() + b"\xff")
    _write(tmp_path / "d.py", f"# normalisation ({spec} steps 8 and 14)\n")
    _write(tmp_path / "e.py", f"# the .mat layout ({spec} 2b)\n")
    _write(tmp_path / "f.proto", "RESIZE_MODE_UNSPECIFIED = 0; // SPECIAL cases\n")
    names = ["a.py", "b.md", "c.bin", "d.py", "e.py", "f.proto", "gone.txt"]
    assert files_citing(tmp_path, names, _CITATION) == ["a.py", "c.bin", "d.py", "e.py"]
