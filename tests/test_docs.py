"""The README is a short product page; README and docs describe the current code only, link only inside the
repository, and cite results files that exist with their provenance.

History (what changed, what earlier code measured) belongs in CHANGELOG.md, not in README.md or docs/.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CHANGELOG = REPO / "CHANGELOG.md"
DOCS = REPO / "docs"
LATEST = "benchmarks/results/latest/"
README_MAX_LINES = 220
PROVENANCE_KEYS = ("tightfit_version", "torch_version", "commit", "dirty")

# Phrases that narrate history instead of describing the current code. Matched case-insensitively, on word
# boundaries ("now" does not match "known" or "nowhere").
HISTORY_PHRASES = (
    "now",
    "now also",
    "used to",
    "the run before",
    "in the run before",
    "runs before",
    "earlier run",
    "earlier runs",
    "earlier code",
    "earlier session",
    "earlier version",
    "previous run",
    "previous runs",
    "previous code",
    "previous session",
    "previous version",
    "this session",
    "last session",
    "latest run",
    "last run",
    "last two runs",
    "last three runs",
    "before this change",
    "after the change",
    "since the change",
    "as before",
)
_HISTORY = re.compile(
    r"\b(?:" + "|".join(re.escape(p).replace(r"\ ", r"\s+") for p in HISTORY_PHRASES) + r")\b", re.IGNORECASE
)

# [text](target) and ![alt](target); <http://...> autolinks and bare URLs are caught by _URL
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
_URL = re.compile(r"\b(?:https?|ftp)://|\bwww\.\S+\.\w|\bmailto:", re.IGNORECASE)
_RESULT = re.compile(re.escape(LATEST) + r"([A-Za-z0-9_.\-]+)")


def _doc_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))] if DOCS.is_dir() else [README]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        m = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it under {README_MAX_LINES} (details go to docs/)"
    )


def test_changelog_exists_with_dated_entries() -> None:
    assert CHANGELOG.is_file(), "CHANGELOG.md holds the history that README and docs leave out"
    dated = re.findall(r"^##\s+\d{4}-\d{2}-\d{2}\b", CHANGELOG.read_text(encoding="utf-8"), re.MULTILINE)
    assert dated, "CHANGELOG.md entries are headed '## YYYY-MM-DD ...'"


def test_history_phrase_pattern() -> None:
    assert _HISTORY.search("it is now faster") and _HISTORY.search("Now it keeps less")
    assert _HISTORY.search("as measured in the run\nbefore")
    assert not _HISTORY.search("a known limitation, nowhere else; unknown blocks; snowy")


@pytest.mark.parametrize("path", _doc_files(), ids=_rel)
def test_no_history_phrases(path: Path) -> None:
    found = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        found += [
            f"{_rel(path)}:{i}: {m.group(0)!r} in {line.strip()[:100]!r}" for m in _HISTORY.finditer(line)
        ]
    # phrases broken over two lines
    text = path.read_text(encoding="utf-8")
    for m in _HISTORY.finditer(text):
        if "\n" in m.group(0):
            found.append(f"{_rel(path)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}")
    assert not found, (
        "history belongs in CHANGELOG.md; README and docs describe the current code:\n" + "\n".join(found)
    )


@pytest.mark.parametrize("path", _doc_files(), ids=_rel)
def test_links_stay_in_the_repository(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    bad = [f"{_rel(path)}: URL {m.group(0)!r}" for m in _URL.finditer(text)]
    targets = [m.group(1) for m in _LINK.finditer(text)] + [m.group(1) for m in _REF_DEF.finditer(text)]
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.\-]*:", target, re.IGNORECASE) or target.startswith("//"):
            bad.append(f"{_rel(path)}: link to {target!r} leaves the repository")
            continue
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / file_part).resolve()
        if REPO not in dest.parents and dest != REPO:
            bad.append(f"{_rel(path)}: link to {target!r} points outside the repository")
        elif not dest.exists():
            bad.append(f"{_rel(path)}: link to {target!r}: {dest.relative_to(REPO)} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{_rel(path)}: link to {target!r}: no heading with anchor #{anchor}")
    assert not bad, "\n".join(bad)


def _cited_results() -> dict[str, set[str]]:
    """results file name -> the README/docs files that cite it."""
    cited: dict[str, set[str]] = {}
    for path in _doc_files():
        for m in _RESULT.finditer(path.read_text(encoding="utf-8")):
            name = m.group(1).rstrip(".")
            if name:
                cited.setdefault(name, set()).add(_rel(path))
    return cited


def test_docs_cite_results_files() -> None:
    assert _cited_results(), f"README and docs cite their numbers' files under {LATEST}"


@pytest.mark.parametrize("name", sorted(_cited_results()) or ["(none)"])
def test_cited_results_exist_with_provenance(name: str) -> None:
    if name == "(none)":
        pytest.skip("no results cited")
    where = ", ".join(sorted(_cited_results()[name]))
    path = REPO / LATEST / name
    assert path.is_file(), f"{LATEST}{name} (cited in {where}) does not exist"
    record = path if path.suffix == ".json" else path.with_suffix(".json")
    assert record.is_file(), f"{LATEST}{name} (cited in {where}) has no JSON record {record.name} beside it"
    data = json.loads(record.read_text(encoding="utf-8"))
    missing = [k for k in PROVENANCE_KEYS if k not in data]
    assert not missing, f"{LATEST}{record.name} lacks provenance fields {missing}"
