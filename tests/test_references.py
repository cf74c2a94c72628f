"""Every reference in the repository points at something in it.

Markdown links (and their #anchors), paths under the repository's top-level directories and
names of Markdown files, wherever they appear in a tracked text file (code, comments, config,
docs, the alert rules' runbook links), must resolve. A reader who follows one lands somewhere.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("adapters", "bench", "config", "deploy", "docs", "gateway", "tests")
# files that exist only once something has run: made by `make`, by deploy/compose/keys.sh,
# or by the tests themselves
GENERATED = frozenset({"deploy/compose/.env", "tests/contract/node/node_modules"})
# npm's lock file (registry URLs), and this file (its own examples)
SKIPPED_FILES = frozenset({"tests/contract/node/package-lock.json", "tests/test_references.py"})

PATH = re.compile(rf"(?<![\w/-])(?:\./)?((?:{'|'.join(TOP_LEVEL)}|\.ci)/[\w./-]*[\w/])")
TOP_FILES = re.compile(
    r"(?<![\w./-])(Dockerfile|Makefile|constraints\.txt|pyproject\.toml|\.dockerignore)\b"
)
# the documents the project was briefed with live outside the repository: nothing may point there
OUTSIDE = re.compile(r"\.\./shared\b|\b(?:DOMAIN|DESIGN|STYLE|NOTES|SCALEOUT)\.md\b")
MARKDOWN_NAME = re.compile(r"(?<![\w./-])([\w./-]*\w\.md)(#[\w-]+)?\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")
RUNBOOK = re.compile(r'runbook: "([^"#]+)(#[^"]+)?"')


def tracked_files() -> list[Path]:
    """What a clone holds, plus new files not yet committed (not what .gitignore excludes)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / name for name in listed if name not in SKIPPED_FILES and (ROOT / name).exists()]


def text_files() -> list[Path]:
    result = []
    for path in tracked_files():
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        result.append(path)
    return result


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@cache
def anchors(markdown: Path) -> frozenset[str]:
    return frozenset(
        slug(line.lstrip("#"))
        for line in markdown.read_text().splitlines()
        if re.match(r"#{1,6} ", line)
    )


@cache
def basenames() -> dict[str, Path]:
    return {path.name: path for path in tracked_files()}


def resolves(reference: str, anchor: str | None, source: Path) -> bool:
    reference = reference.rstrip("/")
    if any(reference == name or reference.startswith(f"{name}/") for name in GENERATED):
        return True
    candidates = [source.parent / reference, ROOT / reference]
    if "/" not in reference and reference in basenames():  # a bare name, e.g. in a table
        candidates.append(basenames()[reference])
    for candidate in candidates:
        if candidate.exists():
            if anchor and candidate.suffix == ".md":
                return anchor.lstrip("#") in anchors(candidate.resolve())
            return True
    return False


def dangling(source: Path) -> list[str]:
    """The references in ``source`` that lead nowhere, sorted, each once."""
    text = source.read_text(encoding="utf-8")
    found = []
    links = LINK.finditer(text) if source.suffix == ".md" else ()
    for match in links:
        target = match.group(1)
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        reference, _, anchor = target.partition("#")
        if reference and not resolves(reference, f"#{anchor}" if anchor else None, source):
            found.append(target)
        if not reference and anchor and anchor not in anchors(source):
            found.append(target)
    for match in PATH.finditer(text):
        path = match.group(1).rstrip(".")
        if "*" in path or "<" in path or "{" in path or text[match.end() : match.end() + 1] == "\\":
            continue  # a glob, a placeholder or a regular expression
        if not resolves(path, None, source):
            found.append(path)
    for match in MARKDOWN_NAME.finditer(text):
        start = match.start()
        if match.group(1).startswith("//") or re.search(r"[a-z]+://\S*$", text[:start][-300:]):
            continue  # part of a URL
        if not resolves(match.group(1), match.group(2), source):
            found.append(match.group(0))
    found.extend(
        match.group(1) for match in TOP_FILES.finditer(text) if not (ROOT / match.group(1)).exists()
    )
    found.extend(match.group(0) for match in OUTSIDE.finditer(text))
    for match in RUNBOOK.finditer(text):
        if "{" in match.group(0):
            continue  # a template (a test building the expected line)
        if not resolves(match.group(1), match.group(2), source):
            found.append(match.group(0))
    return sorted(set(found))


FILES = text_files()


@pytest.mark.parametrize("source", FILES, ids=[str(path.relative_to(ROOT)) for path in FILES])
def test_references_resolve(source: Path) -> None:
    assert [] == dangling(source)


def test_the_checker_finds_what_is_missing(tmp_path: Path) -> None:
    """Guard against a checker that passes everything."""
    sample = tmp_path / "sample.md"
    sample.write_text(
        "See [ops](docs/operations.md#no-such-runbook), docs/nowhere.md, gateway/missing.py,\n"
        "[fine](docs/operations.md#cascadegwdown), gateway/core/ and README.md, Dockerfile,\n"
        "./gateway/gone.py, .ci/absent, ../shared/brief.txt and " + "DESIGN" + ".md.\n"
    )
    expected = [
        "../shared",
        ".ci/absent",
        "DESIGN.md",
        "docs/nowhere.md",
        "docs/operations.md#no-such-runbook",
        "gateway/gone.py",
        "gateway/missing.py",
    ]
    assert expected == dangling(sample)


def test_every_file_is_scanned() -> None:
    names = {str(path.relative_to(ROOT)) for path in FILES}
    for expected in ("README.md", "config/prometheus/cascadegw.rules.yml", "gateway/cli.py"):
        assert expected in names
