"""The image, built and run for real: `make image` (docker/image.sh, with docker or podman) once per session.

Where no engine can be set up (no docker daemon answers, and podman is missing with no root or apt-get
to install it) every test here is skipped, saying so. The pod tests run the container as the Kubernetes
manifest that `ftjob launch k8s` renders describes it: its image (the default, `ftjob:<version>`), command
and arguments, environment (the Secret's keys and the downward-API values filled in as Kubernetes
would), security context (uid 10001, read-only root filesystem, no capabilities, no privilege
escalation), the ConfigMap's spec mounted as a file and each emptyDir as a fresh empty folder. S3 is
moto's server, reached over the host network; nothing else is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import REPO, S3_ENV, numbered_rows, read_until, write_jsonl

from job import __version__

TAG = "localhost/ftjob:latest"
STEPS = 20  # each step is logged to MLflow's SQLite store in the pod (a good part of a second)
SLOW_LOAD_SECONDS = 5
SLOW_MODEL_CODE = f'''
import sys
import time

from transformers import LlamaForCausalLM


class SlowLoadingLlama(LlamaForCausalLM):
    """A model that takes long to load, as a big one read from a network disk does."""

    def __init__(self, config):
        print("slow model: loading", file=sys.stderr, flush=True)
        time.sleep({SLOW_LOAD_SECONDS})
        super().__init__(config)
'''


@dataclass
class Image:
    engine: str  # docker or podman
    tag: str

    def run(self, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.engine, "run", "--rm", *args], capture_output=True, text=True, timeout=timeout
        )

    def inspect(self, reference: str) -> dict:
        shown = subprocess.run(
            [self.engine, "image", "inspect", reference], capture_output=True, text=True, timeout=60
        )
        assert shown.returncode == 0, shown.stderr
        return json.loads(shown.stdout)[0]

    def read_only(self) -> list[str]:
        """A read-only root filesystem with nothing writable but what is mounted, as in a pod (podman
        mounts tmpfs on /tmp, /run and /var/tmp with --read-only unless told not to)."""
        return ["--read-only", *(["--read-only-tmpfs=false"] if self.engine == "podman" else [])]


@pytest.fixture(scope="session")
def image() -> Image:
    if os.environ.get("FTJOB_TEST_INSTALL") == "no":
        pytest.skip(
            "container tests skipped: FTJOB_TEST_INSTALL=no (docker/image.sh engine may install podman)"
        )
    setup = subprocess.run([str(REPO / "docker" / "image.sh"), "engine"], capture_output=True, text=True)
    if setup.returncode == 3:
        pytest.skip(f"container tests skipped: {setup.stderr.strip().splitlines()[-1]}")
    assert setup.returncode == 0, setup.stderr
    built = subprocess.run(
        ["make", "-s", "image"], cwd=REPO, env={**os.environ, "IMAGE": TAG}, capture_output=True, text=True, timeout=1800
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    print(built.stderr.strip().splitlines()[-1])  # built IMAGE in N s: torch ..., size
    return Image(setup.stdout.strip(), TAG)


def test_the_image_is_small_labelled_and_tagged_for_kubernetes(image):
    config = image.inspect(image.tag)
    assert config["Size"] < 2.5e9, f"{config['Size'] / 1e9:.2f} GB"
    assert image.inspect(f"ftjob:{__version__}")["Id"] == config["Id"], "the k8s default image"
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    labels = config["Config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.revision"] == commit
    assert "org.opencontainers.image.source" in labels
    env = dict(e.split("=", 1) for e in config["Config"]["Env"])
    assert env["FTJOB_IMAGE"] == image.tag and env["FTJOB_GIT_COMMIT"] == commit  # MLflow's tags
    assert config["Config"]["User"] == "10001:10001"


def test_the_image_installs_exactly_the_locked_versions(image):
    """So two builds of one commit install the same versions: the lock's, and nothing else."""
    listed = image.run(
        "--network=none", "--entrypoint", "python", image.tag, "-c",
        "import importlib.metadata as m; print('\\n'.join(f'{d.name}=={d.version}' for d in m.distributions()))",
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    normal = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    installed = dict(line.split("==") for line in listed.stdout.split())
    installed = {normal(name): version for name, version in installed.items()}
    locked = dict(
        line.split("==")
        for line in (REPO / "docker" / "requirements.lock").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert installed.pop("ftjob") == __version__
    assert installed.pop("torch") == locked.pop("torch") + "+cpu"
    installed.pop("pip")  # the venv's own, from the base image
    assert installed == locked


def test_help_and_schema_run_as_10001_without_network_on_a_read_only_root(image):
    def ftjob(*args: str) -> str:
        done = image.run("--network=none", *image.read_only(), "--user", "10001:10001", image.tag, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "usage: ftjob" in ftjob("--help")
    assert "train" in json.loads(ftjob("schema"))["properties"]
    assert __version__ in ftjob("--version")


# ---------------------------------------------------------------------------------------------
# The Kubernetes pod, in the container


class Pod:
    """The manifest's pod as an engine command line; each start() is a new pod with fresh emptyDirs."""

    def __init__(self, image: Image, manifest: list[dict], s3_server: str, folder: Path):
        self.image = image
        self.config_map = next(o for o in manifest if o["kind"] == "ConfigMap")
        self.job = next(o for o in manifest if o["kind"] == "Job")
        self.s3_server = s3_server
        self.folder = folder

    def command(self, name: str, output: str) -> list[str]:
        template = self.job["spec"]["template"]["spec"]
        (container,) = template["containers"]
        security = {**template["securityContext"], **container["securityContext"]}
        argv = [self.image.engine, "run", "--rm", "--name", name, "--network=host"]
        argv += ["--user", f"{security['runAsUser']}:{security['runAsGroup']}"]
        assert security["readOnlyRootFilesystem"] and security["capabilities"]["drop"] == ["ALL"]
        assert security["allowPrivilegeEscalation"] is False
        argv += [*self.image.read_only(), "--cap-drop=ALL", "--security-opt=no-new-privileges"]

        volumes = {v["name"]: v for v in template["volumes"]}
        pod_folder = self.folder / name
        for mount in container["volumeMounts"]:
            volume, path = volumes[mount["name"]], pod_folder / mount["name"]
            if "configMap" in volume:  # the spec, with this run's output.uri
                spec = json.loads(self.config_map["data"]["spec.json"])
                spec["output"]["uri"] = output
                path.mkdir(parents=True)
                (path / "spec.json").write_text(json.dumps(spec))
                path.chmod(0o755), (path / "spec.json").chmod(0o644)
                argv += ["--volume", f"{path}:{mount['mountPath']}:ro"]
            elif volume["emptyDir"].get("medium") == "Memory":
                argv += [f"--shm-size={volume['emptyDir']['sizeLimit'].replace('Gi', 'g')}"]
            else:  # an emptyDir: empty, writable by the pod's group (fsGroup)
                path.mkdir(parents=True)
                path.chmod(0o777)
                argv += ["--volume", f"{path}:{mount['mountPath']}"]

        downward = {"JOB_NAME": self.job["metadata"]["name"], "FTJOB_RESTART_ID": "job-uid-1", "NODE_RANK": "0", "POD_NAMESPACE": "default"}  # fmt: skip
        env = {e["name"]: e.get("value", downward.get(e["name"])) for e in container["env"]}
        assert [s["secretRef"]["name"] for s in container["envFrom"]] == ["ftjob-credentials"]
        env |= {**S3_ENV, "AWS_ENDPOINT_URL": self.s3_server}  # the Secret's keys
        env |= {"HOSTNAME": f"{name}-0", "JOB_COMPLETION_INDEX": "0", "KUBERNETES_SERVICE_HOST": "10.96.0.1"}
        for key, value in env.items():
            argv += ["--env", f"{key}={value}"]
        # The pod's command replaces the image's entrypoint, as in Kubernetes.
        command = container["command"]
        return [*argv, "--entrypoint", command[0], container["image"], *command[1:], *container["args"]]

    def start(self, output: str, timeout: int = 300) -> Container:
        name = f"ftjob-test-{uuid.uuid4().hex[:8]}"
        process = subprocess.Popen(
            self.command(name, output), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        return Container(self.image.engine, name, process, timeout)


class Container:
    """A running container; killed (SIGKILL) once `timeout` seconds have passed, and removed at the end."""

    def __init__(self, engine: str, name: str, process: subprocess.Popen, timeout: int):
        self.engine, self.name, self.process = engine, name, process
        self.watchdog = threading.Timer(timeout, self.signal, args=("KILL",))
        self.watchdog.start()

    def signal(self, name: str) -> None:
        subprocess.run([self.engine, "kill", "--signal", name, self.name], capture_output=True, timeout=60)

    def pid_1(self) -> list[str]:
        shown = subprocess.run(
            [self.engine, "exec", self.name, "cat", "/proc/1/cmdline"], capture_output=True, text=True, timeout=60
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        return shown.stdout.strip("\0").split("\0")

    def finish(self) -> tuple[int, str]:
        try:
            out = self.process.stdout.read()
            return self.process.wait(timeout=60), out
        finally:
            self.watchdog.cancel()
            subprocess.run([self.engine, "rm", "--force", self.name], capture_output=True, timeout=60)


def render(spec: dict, folder: Path) -> list[dict]:
    """What `ftjob launch k8s SPEC` writes, with its default image."""
    path = folder / f"spec-{spec['name']}.json"
    path.write_text(json.dumps(spec))
    out = folder / f"{spec['name']}.yaml"
    rendered = subprocess.run(
        [sys.executable, "-m", "job", "launch", "k8s", str(path), "-o", str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    return list(yaml.safe_load_all(out.read_text()))


@pytest.fixture(scope="module")
def bucket(s3_server, tiny_model_dir, tmp_path_factory):
    """A bucket with the tiny model, a slow-loading copy of it and training data; an s3fs filesystem."""
    import s3fs

    name = f"container-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, key=S3_ENV["AWS_ACCESS_KEY_ID"], secret=S3_ENV["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    fs.mkdir(name)
    fs.put(f"{tiny_model_dir}/", f"{name}/models/tiny/", recursive=True)
    slow = tmp_path_factory.mktemp("slow-model")
    (slow / "modeling_slow.py").write_text(SLOW_MODEL_CODE)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_slow.SlowLoadingLlama"}
    (slow / "config.json").write_text(json.dumps(config))
    fs.put(f"{tiny_model_dir}/", f"{name}/models/slow/", recursive=True)
    fs.put(f"{slow}/", f"{name}/models/slow/", recursive=True)
    fs.put(str(write_jsonl(slow / "train.jsonl", numbered_rows())), f"{name}/data/train.jsonl")
    fs.bucket = name
    return fs


def pod_spec(bucket, name: str, model: str, **model_keys) -> dict:
    """A small packed LoRA run with dropout (a resumed run must restore the RNG too)."""
    return {
        "name": name,
        "model": {"source": f"s3://{bucket.bucket}/models/{model}/", **model_keys},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": [f"s3://{bucket.bucket}/data/train.jsonl"], "packing": True, "max_seq_len": 48},
        "train": {"max_steps": STEPS, "micro_batch_size": 2, "checkpoint_every": 1000, "log_every": 1},
        "tracking": {"experiment": "container"},
        "output": {"uri": f"s3://{bucket.bucket}/runs/{name}"},
    }


@pytest.fixture(scope="module")
def pod(image, bucket, s3_server, tmp_path_factory) -> Pod:
    folder = tmp_path_factory.mktemp("pod")
    return Pod(image, render(pod_spec(bucket, "pod", "tiny"), folder), s3_server, folder)


@pytest.fixture(scope="module")
def published(pod, bucket) -> tuple[str, str]:
    """An uninterrupted run in the container: (its output.uri, its output)."""
    output = f"s3://{bucket.bucket}/runs/uninterrupted"
    run = pod.start(output)
    code, out = run.finish()
    assert code == 0, out
    return output, out


def test_the_pod_trains_and_publishes_an_adapter(published, bucket):
    output, out = published
    assert f"step {STEPS}/{STEPS}" in out and f"adapter published to {output}/adapter" in out
    assert bucket.exists(f"{output}/adapter/MANIFEST.json")
    assert bucket.exists(f"{output}/adapter/adapter_model.safetensors")
    assert "MLFLOW_TRACKING_URI is not set in this pod" in out  # loud: the run dies with the pod
    for refused in ("Read-only file system", "Permission denied", "tracking failed"):
        assert refused not in out, "ftjob wrote outside /work, /tmp and $HOME"


def test_sigterm_in_training_exits_75_and_the_same_command_resumes_to_the_same_adapter(
    pod, published, bucket
):
    reference, _ = published
    output = f"s3://{bucket.bucket}/runs/stopped"
    stopped = pod.start(output)
    read_until(stopped.process, f"step 5/{STEPS}")
    assert os.path.basename(stopped.pid_1()[0]) == "tini", "PID 1 must be the init, not ftjob"
    stopped.signal("TERM")  # what the kubelet does: SIGTERM to the container's PID 1
    code, out = stopped.finish()
    assert code == 75, out
    assert bucket.glob(f"{output}/checkpoints/step-*/COMMITTED") and not bucket.exists(f"{output}/adapter")

    code, out = pod.start(output).finish()
    assert code == 0, out
    assert "resuming from the checkpoint at step" in out
    adapter = "adapter/adapter_model.safetensors"
    assert bucket.cat(f"{output}/{adapter}") == bucket.cat(f"{reference}/{adapter}")


def test_sigterm_during_the_model_load_exits_75_without_waiting_out_the_grace_period(
    image, bucket, s3_server, tmp_path_factory
):
    folder = tmp_path_factory.mktemp("slow-pod")
    spec = pod_spec(bucket, "slow", "slow", trust_remote_code=True)
    slow_pod = Pod(image, render(spec, folder), s3_server, folder)
    output = f"s3://{bucket.bucket}/runs/slow"
    loading = slow_pod.start(output)
    read_until(loading.process, "slow model: loading")
    signalled = time.monotonic()
    loading.signal("TERM")
    code, out = loading.finish()
    seconds = time.monotonic() - signalled
    assert code == 75, out
    assert "stopped by a signal before training began" in out and "step 1/" not in out
    grace = spec["train"].get("stop_grace_seconds", 90)
    assert seconds < SLOW_LOAD_SECONDS + 20 < grace, f"{seconds:.0f} s from SIGTERM to exit"
    assert not bucket.exists(f"{output}/checkpoints") and not bucket.exists(f"{output}/adapter")
