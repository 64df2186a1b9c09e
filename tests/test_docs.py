"""The documentation stands alone and points at things that exist.

- every relative Markdown link in README.md, docs/*.md and benchmarks/*.md names a file or
  folder of the repository (resolved against the Markdown file's own folder);
- every repository file path that README.md and docs/*.md cite in backticks exists;
- no text file of the repository cites a document that lives outside it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

LINKED_DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "benchmarks").glob("*.md")])
PATH_DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])

# README.md is edited by its own owner; a problem there is reported, not fixed by this test's
# author, so its failure message says so.
OWNED_ELSEWHERE = {"README.md"}

_FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = ("http://", "https://", "mailto:")

KNOWN_EXTENSIONS = {
    ".py", ".md", ".proto", ".toml", ".yaml", ".yml", ".json", ".jsonl", ".sh", ".txt",
    ".pbtxt", ".pyi", ".cfg", ".ini",
}  # fmt: skip
_SKIP_CHARS = ("*", "<", "{", "..", "$", " ", "://")
_SKIP_PREFIXES = ("/", "~", ".looksync/", "model_repository/", "/tmp")

# Where the search for stray citations looks, and what it leaves out (build outputs, caches,
# environments: nothing there is tracked).
TEXT_SUFFIXES = {".py", ".md", ".proto", ".toml", ".yaml", ".yml", ".sh", ".txt"}
TEXT_NAMES = {"Makefile", "Dockerfile"}
EXCLUDED_DIRS = {
    ".git", ".venv", ".looksync", "model_repository", "node_modules", "__pycache__",
    ".pytest_cache", ".ruff_cache", ".hypothesis", "build",
}  # fmt: skip
# Built from parts so that this file does not cite them itself.
OUTSIDE_DOCUMENTS = ("DESIGN" + ".md", "EXPORT_NOTES" + ".md", ".." + "/shared")


def _without_code_blocks(text: str) -> str:
    return _FENCE.sub("", text)


def markdown_links(text: str) -> list[str]:
    """Link targets outside code (fenced blocks and inline code spans are not links)."""
    prose = _CODE_SPAN.sub("", _without_code_blocks(text))
    return [m.group(1) for m in _LINK.finditer(prose)]


def broken_links(doc: Path) -> list[str]:
    broken = []
    for target in markdown_links(doc.read_text(encoding="utf-8")):
        if target.lower().startswith(_EXTERNAL):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not path:  # an anchor in the same file
            continue
        if not (doc.parent / path).exists():
            broken.append(target)
    return broken


def cited_paths(text: str) -> list[str]:
    """Backticked strings that look like repository file paths."""
    out = []
    for match in _CODE_SPAN.finditer(_without_code_blocks(text)):
        candidate = match.group(2).strip()
        if "/" not in candidate or Path(candidate).suffix not in KNOWN_EXTENSIONS:
            continue
        if any(c in candidate for c in _SKIP_CHARS) or candidate.startswith(_SKIP_PREFIXES):
            continue
        out.append(candidate)
    return out


def _name(doc: Path) -> str:
    return doc.relative_to(REPO).as_posix()


def _failure(doc: Path, what: str, items: list[str]) -> str:
    message = f"{_name(doc)}: {what}: {', '.join(sorted(set(items)))}"
    if _name(doc) in OWNED_ELSEWHERE:
        message += f" ({_name(doc)} is maintained separately: report this to its owner, do not edit it here)"
    return message


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=_name)
def test_relative_markdown_links_point_to_existing_files(doc: Path):
    broken = broken_links(doc)
    assert not broken, _failure(doc, "links to files that do not exist", broken)


@pytest.mark.parametrize("doc", PATH_DOCS, ids=_name)
def test_backticked_repository_paths_exist(doc: Path):
    missing = [p for p in cited_paths(doc.read_text(encoding="utf-8")) if not (REPO / p).exists()]
    assert not missing, _failure(doc, "cites repository paths that do not exist", missing)


def unclosed_fences(text: str) -> list[str]:
    """Fenced code blocks whose closing fence has text after it (Markdown does not close a block
    there: the rest of the document renders as code). Returns "line N: ..." for each."""
    problems, opening = [], None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if opening is None:
            if stripped.startswith(("```", "~~~")):
                opening = stripped[:3]
        elif stripped.startswith(opening):
            if stripped.strip(opening[0]):
                problems.append(f"line {number}: {stripped[:60]}")
            opening = None
    if opening is not None:
        problems.append(f"a {opening} block is never closed")
    return problems


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=_name)
def test_code_fences_close_on_a_line_of_their_own(doc: Path):
    problems = unclosed_fences(doc.read_text(encoding="utf-8"))
    assert not problems, _failure(doc, "has code fences that do not close", problems)


def _text_files():
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS and not d.endswith(".egg-info")]
        for name in files:
            path = Path(root) / name
            if path.suffix in TEXT_SUFFIXES or name in TEXT_NAMES:
                yield path


def test_no_file_cites_documents_outside_the_repository():
    offenders = []
    for path in _text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for needle in OUTSIDE_DOCUMENTS:
                if needle in line:
                    offenders.append(f"{path.relative_to(REPO).as_posix()}:{number}: {needle}")
    assert not offenders, (
        "the repository must stand alone; cite its own docs (docs/ARCHITECTURE.md, README.md) "
        "or state the fact instead:\n" + "\n".join(offenders)
    )


def test_the_checks_find_what_they_look_for():
    """The extractors themselves: links outside code, backticked paths with the skips applied."""
    text = (
        "See [the guide](docs/DEPLOYMENT.md#2-one-gpu-server), [site](https://example.com), "
        "[top](#layout) and `[not](a/link.md)`.\n"
        "```sh\n[in](code/block.md) `gateway/in_block.py`\n```\n"
        "Cited: `gateway/look/pipeline.py`, `benchmarks/RESULTS.md`, `export/triton/*.py`, "
        "`products-<model>-v<N>`, `/tmp/x.py`, `.looksync/index/manifest.json`, `pipeline.py`.\n"
    )
    assert markdown_links(text) == ["docs/DEPLOYMENT.md#2-one-gpu-server", "https://example.com", "#layout"]
    assert cited_paths(text) == ["gateway/look/pipeline.py", "benchmarks/RESULTS.md"]
    assert unclosed_fences("```sh\nx\n```\nprose\n~~~\ny\n~~~\n") == []
    assert unclosed_fences("```sh\nx\n``` prose\n") == ["line 3: ``` prose"]
    assert unclosed_fences("```\nx\n") == ["a ``` block is never closed"]
