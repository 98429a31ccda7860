"""docs/ is the contract, kept true with the code: the spec reference is the schema's own output, and
every link in docs/ and the README leads to a file (and heading) of the repository."""

from __future__ import annotations

import re
from pathlib import Path

from job.cli import main
from job.spec import schema_markdown

REPO = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_spec_reference_is_the_schemas_own_markdown():
    written = (REPO / "docs" / "spec.md").read_text()
    assert written == schema_markdown(), "regenerate it: ftjob schema --markdown > docs/spec.md"


def test_ftjob_schema_markdown_prints_the_reference_byte_for_byte(capsys):
    assert main(["schema", "--markdown"]) == 0
    assert capsys.readouterr().out == schema_markdown()


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a file's headings: lowercased, punctuation but - and _ dropped, spaces as -."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def broken_links(document: Path) -> list[str]:
    broken = []
    for target in LINK.findall(document.read_text()):
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if "://" in target or not linked.is_relative_to(REPO) or not linked.exists():
            broken.append(f"{target}: not a file of the repository")
        elif anchor and anchor not in heading_anchors(linked.read_text()):
            broken.append(f"{target}: no such heading in {linked.relative_to(REPO)}")
    return broken


def test_every_link_in_the_docs_and_the_readme_leads_into_the_repository():
    documents = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert "](docs/README.md)" in documents[0].read_text(), "the README leads to docs/"
    broken = {doc.relative_to(REPO).as_posix(): links for doc in documents if (links := broken_links(doc))}
    assert not broken


def test_the_module_map_names_every_module_and_only_those():
    architecture = (REPO / "docs" / "architecture.md").read_text()
    module_map = architecture.split("## Module map\n", 1)[1].split("\n## ", 1)[0]
    mapped = set(re.findall(r"^\| `((?:job|launch)/[\w/]+\.py)` \|", module_map, flags=re.MULTILINE))
    modules = {
        path.relative_to(REPO).as_posix()
        for package in ("job", "launch")
        for path in (REPO / package).rglob("*.py")
        if path.name != "__init__.py"
    }
    assert sorted(modules - mapped) == [], "add these to docs/architecture.md's module map"
    assert sorted(mapped - modules - {"job/__init__.py"}) == [], "these are gone: take them out of the map"
