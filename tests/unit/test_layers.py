"""The layers of docs/architecture.md ("What may import what"), checked on the import statements of every
module of job/ and launch/ (read with ast: nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The base: what every wing may use. Each imports only other base modules.
BASE = {
    "job", "job.errors", "job.spec", "job.storage", "job.digest", "job.startup", "job.cluster",
    "job.signals", "job.collective", "job.rng", "job.saved", "job.prompt_template",
}  # fmt: skip
# The wings, and the other wings each may use besides the base.
WINGS = {"data": set(), "model": set(), "output": {"model"}, "tracking": {"data"}}
# What launch/ may import of job: the spec, its errors and storage, where the MLflow store is.
LIGHT = {"job", "job.errors", "job.spec", "job.storage", "job.tracking.store"}
# The recipe and the command line: imported only by the command line (and `python -m job`).
ENTRY = {"job.train": {"job.cli"}, "job.cli": {"job.__main__"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    paths = [*REPO.glob("job/**/*.py"), *REPO.glob("launch/**/*.py")]
    return {module_name(path): path for path in sorted(paths)}


def imported(path: Path, known: set[str]) -> set[str]:
    """The modules of job/ and launch/ that a file imports, at any depth of it (a deferred import counts
    too). `from job import x` names the module job.x when there is one, else the package."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
            module = node.module if node.level == 0 else ".".join(filter(None, [base, node.module]))
            found |= {f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names}
    return {name for name in found if name.split(".")[0] in ("job", "launch")}


def layer_problems(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks a rule, as 'importer -> imported: the rule'."""
    problems = []
    for module, imports in sorted(graph.items()):
        for target in sorted(imports - {module}):
            rule = broken_rule(module, target)
            if rule:
                problems.append(f"{module} -> {target}: {rule}")
    return problems


def wing_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "job" and parts[1] in WINGS else None


def broken_rule(module: str, target: str) -> str | None:
    if module.startswith("launch"):
        if target.startswith("job") and target not in LIGHT:
            return f"launch imports only job's light modules ({', '.join(sorted(LIGHT))})"
        return None
    if target.startswith("launch"):
        return "job never imports launch (launch's commands are found through an entry point)"
    if target in ENTRY and module not in ENTRY[target]:
        return f"only {', '.join(sorted(ENTRY[target]))} imports it"
    if module in BASE and target not in BASE:
        return "a base module imports only base modules"
    wing, target_wing = wing_of(module), wing_of(target)
    if wing and target not in BASE and target_wing not in {wing, *WINGS[wing]}:
        may = ", ".join(f"job.{w}" for w in sorted(WINGS[wing])) or "no other wing"
        return f"job.{wing} imports the base, itself and {may}"
    return None


def test_the_import_graph_keeps_the_layers():
    known = modules()
    graph = {name: imported(path, set(known)) for name, path in known.items()}
    problems = layer_problems(graph)
    assert not problems, "\n".join(problems)


def test_every_base_module_exists():
    assert BASE - set(modules()) == set()


@pytest.mark.parametrize(
    ("module", "target", "broken"),
    [
        ("job.cli", "launch.cli", True),
        ("launch.cli", "job.train", True),
        ("launch.cli", "job.spec", False),
        ("job.spec", "job.data.plan", True),
        ("job.data.plan", "job.model.source", True),
        ("job.output.checkpoint", "job.model.source", False),
        ("job.tracking.tracker", "job.data.plan", False),
        ("job.model.loading", "job.train", True),
        ("job.train", "job.output.lease", False),
    ],
)
def test_the_rules_tell_a_broken_layer(module, target, broken):
    assert (broken_rule(module, target) is not None) == broken
