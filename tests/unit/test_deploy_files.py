"""The deployment files read as text: the Dockerfile, its ignore file and lock, the #SBATCH directives
(their linters: tests/integration/test_deploy_lint.py; the sbatch script run: tests/e2e/test_sbatch_script.py)."""

from __future__ import annotations

import json
import re

from helpers import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"


SBATCH = REPO / "slurm" / "ftjob.sbatch"


SECRET_NAME = re.compile(
    r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|^AWS_)", re.IGNORECASE
)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def test_dockerfile_runs_ftjob_as_non_root():
    instructions = dockerfile_instructions()
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "no USER: the image would run as root"
    uid = re.fullmatch(r"(\d+)(?::\d+)?", users[-1])
    assert uid, f"USER {users[-1]!r}: a numeric uid lets Kubernetes' runAsNonRoot verify it"
    assert int(uid.group(1)) != 0
    assert any(keyword == "WORKDIR" for keyword, _ in instructions)

    entrypoint = [json.loads(args) for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert entrypoint and entrypoint[-1] == ["ftjob"], 'ENTRYPOINT must be the exec form ["ftjob"]'
    cmd = [json.loads(args) for keyword, args in instructions if keyword == "CMD"]
    assert cmd and cmd[-1] == ["run"], 'CMD ["run"]: the spec then comes from an argument or FTJOB_SPEC'

    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert froms and all(":" in f and not f.endswith(":latest") for f in froms), froms
    assert any(keyword == "RUN" and re.search(r"pip install .*/", args) for keyword, args in instructions), (
        "the image installs the project from the copied source"
    )


def test_dockerfile_bakes_in_no_secrets_and_does_not_force_offline():
    for keyword, args in dockerfile_instructions():
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]
            for name in names:
                assert not SECRET_NAME.search(name), (
                    f"{keyword} {name}: credentials come from the runtime env"
                )
                assert name != "HF_HUB_OFFLINE", "HF_HUB_OFFLINE is the user's choice, not the image's"


def test_dockerignore_lets_the_package_through():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    assert patterns[0] == "*", "an allow-list keeps .venv, .git and runs out of the build context"
    for needed in ("pyproject.toml", "job/", "launch/", "docker/requirements.lock", "docker/entrypoint.sh"):
        assert f"!{needed}" in patterns, f".dockerignore must let {needed} through"


def test_the_lock_pins_every_dependency_and_the_makefiles_torch():
    """docker/requirements.lock (`make lock`): one version per package, every runtime dependency of
    pyproject.toml among them, and torch at the version the Makefile and the Dockerfile name."""
    import tomllib

    pins = {}
    for line in (REPO / "docker" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = re.fullmatch(r"([a-z0-9-]+)==([0-9][0-9A-Za-z.+!-]*)", line).groups()
            pins[name] = version
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dependency in dependencies:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", dependency).group()).lower()
        assert name in pins, f"{name} is not in docker/requirements.lock: run `make lock`"
    makefile_torch = re.search(r"torch==([0-9.]+)", (REPO / "Makefile").read_text()).group(1)
    dockerfile_torch = re.search(r"ARG TORCH_VERSION=(\S+)", DOCKERFILE.read_text()).group(1)
    assert pins["torch"] == makefile_torch == dockerfile_torch


def test_the_final_image_stage_has_no_build_tools():
    stages = DOCKERFILE.read_text().split("\nFROM ")
    assert len(stages) >= 2, "a multi-stage build"
    final = stages[-1]
    assert "apt-get" not in final and "COPY . " not in final, "packages and the source stay in the builder"
    assert "COPY --from=builder /usr/bin/tini" in final


def sbatch_directives() -> list[str]:
    """#SBATCH options as sbatch reads them: only before the first command."""
    directives = []
    for line in SBATCH.read_text().splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#SBATCH"):
            directives.append(stripped[len("#SBATCH") :].strip())
        elif stripped and not stripped.startswith("#"):
            break
    return directives


def test_sbatch_directives_checkpoint_before_the_time_limit_and_requeue():
    directives = sbatch_directives()
    signal_option = next((d for d in directives if d.startswith("--signal=")), None)
    assert signal_option, "--signal: ftjob checkpoints before the time limit"
    match = re.fullmatch(r"--signal=(?:B:)?(?:SIG)?USR1@(\d+)", signal_option)
    assert match and int(match.group(1)) >= 60, signal_option
    assert "--requeue" in directives
    assert "--open-mode=append" in directives, "a requeued job appends to its log"
    assert "--output=logs/%x-%j.out" in directives
    assert any(d.startswith("--job-name=") for d in directives)
    text = SBATCH.read_text()
    assert re.search(r"\$rc -eq 75|\$\?\s*-eq 75|== 75", text) and re.search(
        r'scontrol requeue "\$\{?SLURM_JOB_ID', text
    )
