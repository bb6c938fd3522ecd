"""The documentation stays true to the repository: the generated config reference is current, the README
is a front door that links every docs page, relative links resolve, and code cites only files it ships."""

from __future__ import annotations

import ast
import importlib.util
import io
import os
import re
import tokenize
from pathlib import Path
from types import ModuleType

import pytest

from prelora_ray.config import valid_keys

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
README_MAX_BYTES = 12 * 1024
THE_TWO_COMMANDS = (
    "pip install -e . && prelora-ray tune search_spaces/quickstart.yaml",
    "pip install -e '.[test]' && python -m pytest -q",
)
CODE_DIRS = ("prelora_ray", "analysis", "benchmarks", "tests")
MARKDOWN = sorted([README, *DOCS.glob("*.md")])

# [text](target) and [label]: target, outside code; a target with a scheme or only an anchor is not a file
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
FENCED_CODE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# a markdown file's name or path in prose: a bare name, a path from the root, or one relative to the citing file
MD_NAME = re.compile(r"(?<![\w./:-])((?:\.\.?/)*(?:[\w.-]+/)*[\w-][\w.-]*\.md)\b")


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_config_reference", DOCS / "make_config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _relative_links(text: str) -> list[str]:
    """The link targets of a markdown text that name a file (no scheme, not an anchor alone), anchors cut off."""
    prose = INLINE_CODE.sub("", FENCED_CODE.sub("", text))
    targets = INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)
    files = []
    for target in targets:
        if SCHEME.match(target) or target.startswith("#"):
            continue
        files.append(target.split("#", 1)[0].split("?", 1)[0])
    return files


def _prose_of_python(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and every string that stands alone as a statement (the docstrings)."""
    source = path.read_text(encoding="utf-8")
    found = [
        (node.lineno, node.value.value)
        for node in ast.walk(ast.parse(source, filename=str(path)))
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    ]
    found += [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    ]
    return found


def _markdown_files_in_repo() -> set[str]:
    """Names of the repository's markdown files (what a file name without a folder in a docstring may mean)."""
    skip = {".git", "__pycache__", ".venv", "venv", "node_modules", ".pytest_cache", ".ruff_cache"}
    return {
        p.name
        for p in REPO.rglob("*.md")
        if not any(part in skip or part.endswith(".egg-info") for part in p.relative_to(REPO).parts)
    }


def _cited_file_exists(name: str, source: Path, bare_names: set[str]) -> bool:
    """A path resolves, from the repository root or from the citing file's folder, to a file inside the
    repository; a bare name is some markdown file's name in it."""
    if "/" not in name:
        return name in bare_names
    for base in (REPO, source.parent):
        candidate = (base / name).resolve()
        if candidate.is_relative_to(REPO) and candidate.is_file():
            return True
    return False


# -- the generated configuration reference --------------------------------------------------------------


def test_the_committed_config_reference_is_current() -> None:
    committed = (DOCS / "config.md").read_text(encoding="utf-8")
    assert committed == _load_generator().render(), (
        "docs/config.md is not what the dataclasses give: run python docs/make_config_reference.py"
    )


def test_the_config_reference_documents_every_config_key() -> None:
    reference = (DOCS / "config.md").read_text(encoding="utf-8")
    missing = [key for key in valid_keys() if f"`{key}`" not in reference]
    assert not missing, f"docs/config.md lacks {missing}"


def test_the_generator_check_mode_sees_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = _load_generator()
    monkeypatch.setattr(generator, "OUT", tmp_path / "config.md")
    (tmp_path / "config.md").write_text("stale\n", encoding="utf-8")
    assert generator.main(["--check"]) == 1
    assert generator.main([]) == 0
    assert generator.main(["--check"]) == 0
    assert (tmp_path / "config.md").read_text(encoding="utf-8") == generator.render()


# -- the README as a front door -----------------------------------------------------------------------


def test_the_readme_is_a_front_door_with_both_commands() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes: at most {README_MAX_BYTES}; move detail to docs/"
    text = README.read_text(encoding="utf-8")
    for command in THE_TWO_COMMANDS:
        assert command in text, f"README.md lacks the command {command!r}"


def test_the_readme_links_every_docs_page() -> None:
    linked = {(REPO / target).resolve() for target in _relative_links(README.read_text(encoding="utf-8"))}
    unlinked = [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked]
    assert not unlinked, f"README.md's 'Where to go next' lacks {unlinked}"


# -- links and citations --------------------------------------------------------------------------------


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files(page: Path) -> None:
    broken = [
        target for target in _relative_links(page.read_text(encoding="utf-8")) if not (page.parent / target).exists()
    ]
    assert not broken, f"{page.relative_to(REPO)} links to files that do not exist: {broken}"


def test_docstrings_and_comments_cite_only_markdown_files_in_the_repository() -> None:
    bare_names = _markdown_files_in_repo()
    missing = []
    for folder in CODE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            for line, text in _prose_of_python(path):
                for name in MD_NAME.findall(text):
                    if not _cited_file_exists(name, path, bare_names):
                        missing.append(f"{path.relative_to(REPO)}:{line}: {name}")
    assert not missing, "docstrings or comments cite markdown files the repository does not hold:\n" + "\n".join(
        missing
    )


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("see docs/algorithms.md, section LTE", ["docs/algorithms.md"]),
        ("read as ../shared/design/notes.md fixes them", ["../shared/design/notes.md"]),
        ("(stack.md)", ["stack.md"]),
        ("every `*.md` file, https://example.org/x.md", []),
    ],
)
def test_the_citation_pattern(text: str, names: list[str]) -> None:
    assert MD_NAME.findall(text) == names


def test_a_citation_outside_the_repository_does_not_count(tmp_path: Path) -> None:
    source = REPO / "prelora_ray" / "optim.py"
    assert _cited_file_exists("docs/algorithms.md", source, set())
    assert _cited_file_exists("../docs/algorithms.md", source, set())
    outside = tmp_path / "notes.md"
    outside.write_text("a file that exists, outside the repository\n", encoding="utf-8")
    assert not _cited_file_exists(os.path.relpath(outside, REPO), source, set())
    assert not _cited_file_exists(os.path.relpath(outside, source.parent), source, set())
    assert not _cited_file_exists("notes.md", source, {"README.md"})
    assert _cited_file_exists("README.md", source, {"README.md"})
