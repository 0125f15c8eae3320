"""The documentation holds together: README.md, docs/*.md and benchmarks/README.md.

Relative Markdown links `[text](target)` (images included) point at files that exist,
relative to the file that holds the link; a `#anchor` into a Markdown file names one of
its headings, slugged as GitHub slugs them. README.md stays short and points only inside
the repository or at public web pages. Links and headings inside fenced code blocks and
inline code spans are not Markdown, so they are not read.
"""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted([README, ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")])
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(r"\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = ("http://", "https://", "mailto:")


def _prose_lines(path: pathlib.Path) -> list[str]:
    """The file's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _links(path: pathlib.Path) -> list[str]:
    """Every link target in the file's prose, inline code spans left out."""
    return [match.group(2) for line in _prose_lines(path)
            for match in LINK.finditer(INLINE_CODE.sub("", line))]


def _relative_links(path: pathlib.Path) -> list[str]:
    return [target for target in _links(path) if not target.lower().startswith(EXTERNAL)]


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links and emphasis rendered away) in lower
    case, every character but letters, digits, '_', '-' and spaces dropped, spaces as '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    """The anchors of a Markdown file's headings; a repeated slug gets -1, -2, ... as on
    GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for line in _prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def _split(doc: pathlib.Path, target: str) -> tuple[pathlib.Path, str]:
    path, _, anchor = target.partition("#")
    return (doc if path == "" else (doc.parent / path).resolve()), anchor


def _name(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_documentation_files_exist():
    assert README.is_file() and (ROOT / "benchmarks" / "README.md").is_file()
    assert list((ROOT / "docs").glob("*.md")), "docs/ has no pages"


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_relative_links_resolve_to_existing_files(doc):
    missing = [target for target in _relative_links(doc) if not _split(doc, target)[0].exists()]
    assert missing == [], f"{_name(doc)} links to files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_anchors_into_markdown_files_name_a_heading(doc):
    broken = []
    for target in _relative_links(doc):
        path, anchor = _split(doc, target)
        if anchor and path.suffix == ".md" and path.is_file() and anchor not in anchors(path):
            broken.append(target)
    assert broken == [], f"{_name(doc)} links to headings that do not exist: {broken}"


def test_readme_has_at_most_250_lines():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


# the team's folder beside the repository, which a clone does not have (spelled in two
# pieces so that this file does not match itself)
TEAM_FOLDER = "../" + "shared"


def test_readme_does_not_mention_shared():
    text = README.read_text(encoding="utf-8")
    assert TEAM_FOLDER not in text and "shared" + "/" not in text
TEXT_SUFFIXES = {".py", ".md", ".toml", ".ini", ".txt", ".sh", ".cfg", ".yaml", ".json"}


def test_no_file_of_the_repository_points_to_the_team_folder():
    skipped = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
    files = [path for path in ROOT.rglob("*")
             if path.is_file() and not skipped & set(path.relative_to(ROOT).parts)
             and (path.suffix in TEXT_SUFFIXES or path.parent.name == ".ci")]
    assert len(files) > 50, "the walk found too few files to mean anything"
    pointing = [str(path.relative_to(ROOT)) for path in files
                if TEAM_FOLDER in path.read_text(encoding="utf-8", errors="replace")]
    assert pointing == []


def test_readme_links_stay_inside_the_repository():
    outside = [target for target in _relative_links(README)
               if ROOT not in _split(README, target)[0].parents]
    assert outside == [], f"README.md links outside the repository: {outside}"


def test_github_slug_matches_github_for_code_and_punctuation():
    assert github_slug("Corpora larger than memory: `--mode prepare`") == \
        "corpora-larger-than-memory---mode-prepare"
    assert github_slug("The training stream (`data/stream.py`)") == \
        "the-training-stream-datastreampy"
    assert github_slug("ring_memory") == "ring_memory"
    assert github_slug("Evidence: out to Hugging Face, back in, and extended") == \
        "evidence-out-to-hugging-face-back-in-and-extended"
