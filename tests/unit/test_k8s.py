"""Kubernetes: what `ftjob launch k8s` renders, and the kustomize files under k8s/ (which must equal it).

Every set of objects is validated with kubernetes-validate (strict, the newest schema it ships) and held
to the Job's contract; the pod's command runs here with the pod's environment and its spec as a file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from helpers import REPO, Ran, ftjob
from k8s_helpers import (
    K8S,
    env_of,
    example_spec,
    example_spec_file,
    file_objects,
    of_kind,
    rendered,
    the_container,
)

from job.spec import validate_spec
from launch.k8s import K8sOptions, render
from launch.sweep import point_specs

SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|^AWS_)", re.I)


EVERY_OPTION = {
    "nodes": 4,
    "gpus_per_node": 8,
    "image": "registry.example.com/ftjob:0.2",
    "namespace": "ml",
    "queue": "team-a",
    "tolerations": ["dedicated=ml:NoSchedule", "spot"],
    "node_selector": ["pool=h100"],
    "priority_class": "training",
    "service_account": "trainer",
    "active_deadline_seconds": 86400,
    "env": ["LOG_LEVEL=debug"],
    "secrets": ["s3-credentials", "hf"],
    "disk": "500Gi",
    "spool_claim": "ftjob-spool",
}
MANIFEST_SETS = {
    "k8s/base": lambda: file_objects(K8S / "base"),
    "1 node, CPU": lambda: rendered(),
    "4 nodes, 8 GPUs, every option": lambda: rendered(**EVERY_OPTION),
    "sweep of 2 on 2 nodes": lambda: render(
        point_specs(example_spec(), [{"adapter.r": 8}, {"adapter.r": 16}]), K8sOptions(nodes=2)
    ),
}


@pytest.fixture(params=list(MANIFEST_SETS))
def objects(request) -> list[dict]:
    return MANIFEST_SETS[request.param]()


def test_every_object_validates_strictly_against_the_newest_schema(objects):
    version = kubernetes_validate.latest_version()
    for doc in objects:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{doc['kind']}/{doc['metadata']['name']} invalid at {'.'.join(map(str, e.path))}: {e.message}"
            )


def test_every_job_is_indexed_one_pod_per_node_with_agreeing_counts(objects):
    jobs = of_kind(objects, "Job")
    assert jobs and len(of_kind(objects, "ConfigMap")) == len(jobs)
    for job in jobs:
        spec, env = job["spec"], env_of(the_container(job))
        assert spec["completionMode"] == "Indexed"
        assert spec["parallelism"] == spec["completions"] == int(env["NNODES"]["value"]) >= 1
        assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"].endswith(
            "['batch.kubernetes.io/job-completion-index']"
        )
        restart = env["FTJOB_RESTART_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
        assert (
            restart == "metadata.labels['batch.kubernetes.io/controller-uid']"
        )  # one per Job, its retries too
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        assert env["FTJOB_IMAGE"]["value"] == the_container(job)["image"]


def documented_exit_codes() -> dict[int, str]:
    """The exit codes as docs/contracts.md states them: the "| N | meaning |" rows under "## Exit codes"."""
    section = (REPO / "docs" / "contracts.md").read_text().split("## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    return {int(m[1]): m[2] for m in re.finditer(r"^\| (\d+) \| (.+) \|$", section, flags=re.MULTILINE)}


def test_the_failure_policy_follows_the_documented_exit_codes(objects):
    codes = documented_exit_codes()
    assert "bad spec" in codes[2] and "bad data" in codes[3] and "requeue" in codes[75]
    for job in of_kind(objects, "Job"):
        spec = job["spec"]
        assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it
        action = {}
        for rule in spec["podFailurePolicy"]["rules"]:
            if "onExitCodes" in rule:
                assert rule["onExitCodes"]["containerName"] == "ftjob"
                action.update(dict.fromkeys(rule["onExitCodes"]["values"], rule["action"]))
        ignored = [75, 76] if spec["parallelism"] > 1 else [75]  # several nodes: a lost peer is no root cause
        assert action == {2: "FailJob", 3: "FailJob", **dict.fromkeys(ignored, "Ignore")}
        disruptions = [r for r in spec["podFailurePolicy"]["rules"] if "onPodConditions" in r]
        assert disruptions == [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
        assert (
            spec.get("backoffLimit", spec.get("backoffLimitPerIndex")) >= 1
            and spec["ttlSecondsAfterFinished"] > 0
        )
        assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > 90  # the spec's stop grace


def test_pods_are_restricted_with_writable_scratch_only(objects):
    for job in of_kind(objects, "Job"):
        pod, container = job["spec"]["template"]["spec"], the_container(job)
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert {"/work", "/tmp", "/home/ftjob"} <= {path for path, v in mounts.items() if "emptyDir" in v}
        assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
        assert "configMap" in mounts["/spec"]
        # the disk a pod may fill is bounded: each writable folder, and the pod's ephemeral storage
        disk = container["resources"]["limits"]["ephemeral-storage"]
        assert container["resources"]["requests"]["ephemeral-storage"] == disk
        assert all(v["emptyDir"].get("sizeLimit") for v in mounts.values() if "emptyDir" in v)


def test_credentials_only_by_reference(objects):
    assert not of_kind(objects, "Secret")
    for job in of_kind(objects, "Job"):
        container = the_container(job)
        for name, entry in env_of(container).items():
            assert not (SECRET_NAME.search(name) and "value" in entry), f"{name} has a literal value"
        assert all("secretRef" in source for source in container["envFrom"])
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", yaml.safe_dump_all(objects))


def test_several_nodes_meet_at_pod_0_through_a_headless_service(objects):
    for job in of_kind(objects, "Job"):
        name, nodes = job["metadata"]["name"], job["spec"]["parallelism"]
        pod, env = job["spec"]["template"]["spec"], env_of(the_container(job))
        services = [s for s in of_kind(objects, "Service") if s["metadata"]["name"] == name]
        if nodes == 1:
            assert not services and "MASTER_ADDR" not in env and "subdomain" not in pod
            continue
        (service,) = services
        assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
        assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
        assert pod["subdomain"] == name and env["MASTER_ADDR"]["value"] == f"$(JOB_NAME)-0.{name}"
        assert (
            env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
            == "metadata.labels['batch.kubernetes.io/job-name']"
        )


def test_every_option_reaches_the_manifest():
    objects = rendered(**EVERY_OPTION)
    assert {o["metadata"]["namespace"] for o in objects} == {"ml"}
    (job,) = of_kind(objects, "Job")
    pod, container = job["spec"]["template"]["spec"], the_container(job)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["activeDeadlineSeconds"] == 86400
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Exists"},
    ]
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["priorityClassName"] == "training" and pod["serviceAccountName"] == "trainer"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["image"] == "registry.example.com/ftjob:0.2"
    assert env_of(container)["LOG_LEVEL"]["value"] == "debug"
    assert [s["secretRef"]["name"] for s in container["envFrom"]] == ["s3-credentials", "hf"]
    assert container["resources"]["limits"]["ephemeral-storage"] == "500Gi"
    volumes = {v["name"]: v for v in pod["volumes"]}
    (spool,) = [
        m
        for m in container["volumeMounts"]
        if m["mountPath"] == env_of(container)["FTJOB_SPOOL_DIR"]["value"]
    ]
    assert volumes[spool["name"]] == {
        "name": spool["name"],
        "persistentVolumeClaim": {"claimName": "ftjob-spool"},
    }
    cpu_pod = of_kind(rendered(), "Job")[0]["spec"]["template"]["spec"]
    assert (
        "tolerations" not in cpu_pod
        and "nvidia.com/gpu"
        not in the_container({"spec": {"template": {"spec": cpu_pod}}})["resources"]["limits"]
    )


def test_a_sweep_renders_a_job_per_point_with_its_own_spec():
    objects = MANIFEST_SETS["sweep of 2 on 2 nodes"]()
    assert [o["metadata"]["name"] for o in of_kind(objects, "Job")] == ["ftjob-p00", "ftjob-p01"]
    specs = [json.loads(c["data"]["spec.json"]) for c in of_kind(objects, "ConfigMap")]
    assert [s["adapter"]["r"] for s in specs] == [8, 16]
    assert [s["name"] for s in specs] == ["ftjob-p00", "ftjob-p01"]
    assert len({validate_spec(s).output_uri for s in specs}) == 2  # {name} in output.uri tells them apart


def test_the_base_is_what_launch_renders_for_one_node():
    assert file_objects(K8S / "base") == rendered(gpus_per_node=1)


def run_launch_k8s(*args: str, env: dict | None = None) -> Ran:
    return ftjob("launch", "k8s", *args, env=env, timeout=120)


def test_the_command_prints_writes_or_refuses(tmp_path):
    spec = example_spec_file(tmp_path)
    printed = run_launch_k8s(str(spec), "--nodes", "2", "--kind", "job")
    assert printed.returncode == 0, printed.stderr
    assert [o["kind"] for o in yaml.safe_load_all(printed.stdout)] == ["ConfigMap", "Service", "Job"]
    written = run_launch_k8s(str(spec), "-o", str(tmp_path / "out.yaml"))
    assert written.returncode == 0 and "wrote 2 objects" in written.stdout
    assert [o["kind"] for o in yaml.safe_load_all((tmp_path / "out.yaml").read_text())] == [
        "ConfigMap",
        "Job",
    ]

    literal = run_launch_k8s(str(spec), "--env", "AWS_SECRET_ACCESS_KEY=abc")
    assert literal.returncode == 2 and "put it in a Secret and pass --secret" in literal.stderr
    in_spec = run_launch_k8s(str(spec), "--set", 'storage_options={"s3": {"secret": "abc"}}')
    assert in_spec.returncode == 2 and "storage_options.s3.secret" in in_spec.stderr
    assert "abc" not in literal.stderr + in_spec.stderr


def test_the_image_is_pinned_and_what_cannot_be_checked_is_warned_about(tmp_path):
    from job import __version__

    assert the_container(of_kind(rendered(), "Job")[0])["image"] == f"ftjob:{__version__}"
    spec = example_spec_file(tmp_path)
    defaults = run_launch_k8s(str(spec))
    assert defaults.returncode == 0, defaults.stderr
    assert "is not pinned" not in defaults.stderr
    assert "no MLFLOW_TRACKING_URI in --env" in defaults.stderr and "no --spool-claim" in defaults.stderr
    for image in ("ftjob", "ftjob:latest", "registry:5000/team/ftjob"):
        assert f"--image {image} is not pinned" in run_launch_k8s(str(spec), "--image", image).stderr
    shared = run_launch_k8s(str(spec), "--spool-claim", "spool", "--nodes", "2")
    assert "--spool-claim spool is mounted by all 2 pods: it must be ReadWriteMany" in shared.stderr
    pinned = run_launch_k8s(str(spec), "--image", "registry:5000/ftjob@sha256:" + "a" * 64, "--env",
                            "MLFLOW_TRACKING_URI=http://mlflow:5000", "--spool-claim", "spool")  # fmt: skip
    assert pinned.returncode == 0 and "warning" not in pinned.stderr, pinned.stderr


def test_names_are_valid_and_stay_apart():
    from launch.k8s import object_name

    assert object_name("Support_Bot.v2") == "support-bot-v2"
    assert object_name("7b-lora") == "ftjob-7b-lora"  # a Service name starts with a letter
    long_a, long_b = "x" * 60 + "-p00", "x" * 60 + "-p01"
    assert len(object_name(long_a)) <= 52 and object_name(long_a) != object_name(long_b)
    services = of_kind(render([validate_spec({**example_spec().model_dump(mode="json"), "name": "7b"})], K8sOptions(nodes=2)), "Service")  # fmt: skip
    assert services[0]["metadata"]["name"] == "ftjob-7b"


@pytest.mark.parametrize(
    "env",
    [
        "AWS_SECRET_ACCESS_KEY=abc",
        "GITHUB_PAT=ghp_abcdefghijklmnopqrstuvwxyz0123",
        "DB_URL=postgres://u:pw@db/x",
    ],
)
def test_a_literal_secret_in_env_is_refused_by_name_or_value(tmp_path, env):
    refused = run_launch_k8s(str(example_spec_file(tmp_path)), "--env", env)
    assert refused.returncode == 2 and "put it in a Secret" in refused.stderr
    assert env.split("=", 1)[1] not in refused.stderr


def test_a_local_output_is_refused_for_pods(tmp_path):
    refused = run_launch_k8s(str(example_spec_file(tmp_path)), "--set", "output.uri=./runs/{name}")
    assert refused.returncode == 2 and "a pod's local disk goes with the pod" in refused.stderr


def test_the_pods_run_the_spec_resolved_here_and_no_spec_override(tmp_path):
    """The login shell's FTJOB__ variables are folded into the ConfigMap's spec, under --set, and never
    reach the pod; `--env FTJOB__...` (which the pod would apply past the spec checked here) and a
    variable the container sets itself are refused."""
    from job.errors import UserError

    spec = example_spec_file(tmp_path)
    login_shell = {"FTJOB__TRAIN__LEARNING_RATE": "0.5", "FTJOB__TRAIN__SEED": "7"}
    printed = run_launch_k8s(str(spec), "--set", "train.learning_rate=0.001", env=login_shell)
    assert printed.returncode == 0, printed.stderr
    objects = list(yaml.safe_load_all(printed.stdout))
    resolved = json.loads(of_kind(objects, "ConfigMap")[0]["data"]["spec.json"])
    assert (resolved["train"]["learning_rate"], resolved["train"]["seed"]) == (0.001, 7)
    assert not [
        name for name in env_of(the_container(of_kind(objects, "Job")[0])) if name.startswith("FTJOB__")
    ]

    refused = run_launch_k8s(str(spec), "--env", "FTJOB__MODEL__TRUST_REMOTE_CODE=true")
    assert refused.returncode == 2 and "pass --set model.trust_remote_code=VALUE instead" in refused.stderr
    for item in ("FTJOB_SPEC=/elsewhere.json", "NODE_RANK=3", "FTJOB_RESTART_ID=again"):
        with pytest.raises(UserError, match=f"--env {item.split('=')[0]}: set by ftjob launch itself"):
            rendered(env=[item])


def test_pods_take_only_secret_values_from_the_environment(objects):
    """Every key of a --secret Secret becomes a variable of the pod: the pod's own command (which a
    Secret cannot change, as it could a variable) limits the FTJOB__ ones to secret values."""
    for job in of_kind(objects, "Job"):
        args = the_container(job)["args"]
        assert args[args.index("--env-overrides") + 1] == "secrets"


@pytest.mark.parametrize(
    "key,value,secret",
    [
        ("storage_options.s3.key", "id-1", True),
        ("storage_options.s3.client_kwargs.aws_secret_access_key", "s-1", True),
        ("storage_options.http.headers.authorization", "basic x", True),
        ("tracking.tags.api_token", "t-1", True),
        ("storage_options.s3.endpoint_url", "http://minio:9000", False),
        ("tracking.tags.team", "search", False),
        ("model.trust_remote_code", True, False),
        ("output.uri", "s3://elsewhere/{name}", False),
    ],
)
def test_secret_keys_are_those_the_published_spec_hides(key, value, secret):
    from job.spec import apply_override, flatten, is_secret_key, public_dict

    data = example_spec().model_dump(mode="json")
    apply_override(data, key, value, "test")
    hidden = flatten(public_dict(validate_spec(data))).get(key) != value
    assert is_secret_key(key) == hidden == secret


def run_pod_command(tmp_path: Path, monkeypatch, args: list[str] | None = None) -> tuple[int, list]:
    """main() with the rendered pod's arguments (or `args`) and the test's environment: its exit code
    and the specs of the workers it would have started (they are not)."""
    from job import cli

    started = []

    def launch_workers(spec, *_) -> int:
        started.append(spec)
        return 0

    monkeypatch.setattr(cli, "launch_workers", launch_workers)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # main() sets it for the process
    pod_args = the_container(of_kind(rendered(), "Job")[0])["args"]
    spec_file = str(example_spec_file(tmp_path))
    code = cli.main([spec_file if a == "/spec/spec.json" else a for a in args or pod_args])
    return code, started


def test_a_pod_takes_only_secret_values_from_a_secret(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FTJOB__MODEL__TRUST_REMOTE_CODE", "true")
    monkeypatch.setenv("FTJOB__STORAGE_OPTIONS__S3__KEY", "id-1")
    assert run_pod_command(tmp_path, monkeypatch) == (2, [])
    err = capsys.readouterr().err
    assert "FTJOB__MODEL__TRUST_REMOTE_CODE: remove it" in err and "--set model.trust_remote_code" in err
    assert "STORAGE_OPTIONS" not in err and "Traceback" not in err

    code, [spec] = run_pod_command(tmp_path, monkeypatch, ["run", "/spec/spec.json", "--nproc-per-node", "1"])
    assert code == 0 and spec.model.trust_remote_code  # a plain ftjob run takes every override

    monkeypatch.delenv("FTJOB__MODEL__TRUST_REMOTE_CODE")
    monkeypatch.setenv("FTJOB__STORAGE_OPTIONS__S3__SECRET", "s-1")
    monkeypatch.setenv("FTJOB__TRACKING__TAGS__API_TOKEN", "t-1")
    code, [spec] = run_pod_command(tmp_path, monkeypatch)
    assert code == 0 and not spec.model.trust_remote_code
    assert spec.storage_options == {"s3": {"key": "id-1", "secret": "s-1"}}
    assert spec.tracking.tags == {"api_token": "t-1"}


def test_a_secret_in_the_spec_is_refused_naming_where_it_goes_instead():
    from job.errors import UserError

    data = example_spec().model_dump(mode="json")
    data["storage_options"] = {"s3": {"key": "id-1"}}
    data["data"]["eval"] = ["https://host/eval.jsonl?sig=abc"]
    with pytest.raises(UserError) as refused:
        render([validate_spec(data)], K8sOptions())
    message = str(refused.value)
    assert "storage_options.s3.key: put it in a Secret as FTJOB__STORAGE_OPTIONS__S3__KEY" in message
    assert "data.eval: looks like a credential, which a pod cannot take from a Secret" in message
    assert "id-1" not in message and "sig=abc" not in message
