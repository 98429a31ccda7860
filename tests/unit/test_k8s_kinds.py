"""`ftjob launch k8s --kind job|jobset|trainjob`: what Kubernetes does with each exit code, the JobSet and
TrainJob checked against their APIs' models (kubeflow-trainer-api ships both), Kueue's label, the
rendezvous address, and the options each kind refuses.

No API server runs here: `outcome` reads the rendered policies as the Job and JobSet controllers do
(the first matching rule wins; a JobSet sees only its Job's failure reason, else RestartJobSet)."""

from __future__ import annotations

import copy
import re

import kubernetes_validate
import pytest
import yaml
from k8s_helpers import env_of, example_spec, example_spec_file, of_kind, rendered
from kubeflow_trainer_api.models import JobsetV1alpha2JobSet, TrainerV1alpha1TrainJob

from job.errors import UserError
from job.spec import validate_spec
from launch.cli import launch_main
from launch.k8s import K8sOptions, render

DISRUPTION = (
    "disruption"  # the pod's DisruptionTarget condition: evicted, preempted, its node drained or lost
)
FAILED = "fails"
UNCOUNTED = "pod replaced, not counted"


def top_object(objects: list[dict]) -> dict:
    (top,) = [o for o in objects if o["kind"] in ("Job", "JobSet", "TrainJob")]
    return top


def pod_failure_action(job_spec: dict, failure: int | str) -> str:
    """The Job controller's action for a failed pod: the first matching podFailurePolicy rule, else Count."""
    for rule in job_spec["podFailurePolicy"]["rules"]:
        if failure == DISRUPTION:
            if any(c["type"] == "DisruptionTarget" for c in rule.get("onPodConditions", [])):
                return rule["action"]
        elif "onExitCodes" in rule:
            codes = rule["onExitCodes"]
            assert codes["containerName"] == "ftjob"
            if (failure in codes["values"]) == (codes["operator"] == "In"):
                return rule["action"]
    return "Count"


def outcome(top: dict, failure: int | str) -> str:
    """What Kubernetes does when one pod of the job fails so (an exit code, or DISRUPTION)."""
    if top["kind"] == "Job":
        spec = top["spec"]
        action = pod_failure_action(spec, failure)
        if action != "Count":
            return {"FailJob": FAILED, "Ignore": UNCOUNTED}[action]
        if "backoffLimitPerIndex" in spec:
            assert spec["maxFailedIndexes"] == 0  # one node past its limit fails the Job
            return f"pod replaced, counted for its node (limit {spec['backoffLimitPerIndex']})"
        return f"pod replaced, counted (limit {spec['backoffLimit']})"
    (replicated,) = top["spec"]["replicatedJobs"]
    job_spec = replicated["template"]["spec"]
    action = pod_failure_action(job_spec, failure)
    if action == "Ignore":
        return UNCOUNTED
    assert action in ("FailJob", "Count") and job_spec["backoffLimit"] == 0
    reason = "PodFailurePolicy" if action == "FailJob" else "BackoffLimitExceeded"
    policy = top["spec"]["failurePolicy"]
    rules = [r for r in policy["rules"] if reason in r.get("onJobFailureReasons") or not r.get("onJobFailureReasons")]  # fmt: skip
    jobset_action = rules[0]["action"] if rules else "RestartJobSet"
    return {
        "FailJobSet": FAILED,
        "RestartJobSet": f"every pod restarted, counted (limit {policy['maxRestarts']})",
        "RestartJobSetAndIgnoreMaxRestarts": "every pod restarted, not counted",
    }[jobset_action]


COUNTED = "pod replaced, counted (limit 3)"
PER_NODE = "pod replaced, counted for its node (limit 3)"
GANG = "every pod restarted, counted (limit 3)"
# exit code -> (job on 1 node, job on 4 nodes, jobset on 4 nodes, jobset on 1 node)
WHAT_KUBERNETES_DOES = {
    75: (UNCOUNTED, UNCOUNTED, UNCOUNTED, UNCOUNTED),  # checkpointed after SIGTERM: requeue
    76: (COUNTED, UNCOUNTED, UNCOUNTED, GANG),  # a lost peer; on one node, a worker of this pod died
    2: (FAILED, FAILED, FAILED, FAILED),
    3: (FAILED, FAILED, FAILED, FAILED),
    1: (COUNTED, PER_NODE, GANG, GANG),
    137: (COUNTED, PER_NODE, GANG, GANG),  # SIGKILLed: the OOM killer
    DISRUPTION: (UNCOUNTED, UNCOUNTED, UNCOUNTED, UNCOUNTED),
}
SHAPES = [("job", 1), ("job", 4), ("jobset", 4), ("jobset", 1)]


@pytest.mark.parametrize("failure", list(WHAT_KUBERNETES_DOES), ids=str)
def test_each_exit_code_does_what_it_means_for_each_kind(failure):
    for (kind, nodes), expected in zip(SHAPES, WHAT_KUBERNETES_DOES[failure], strict=True):
        top = top_object(rendered(nodes=nodes, kind=kind))
        assert outcome(top, failure) == expected, (kind, nodes)


def test_a_jobset_fails_at_its_deadline_and_restarts_at_most_max_restarts_times():
    top = top_object(rendered(nodes=4, kind="jobset", max_restarts=7, active_deadline_seconds=3600))
    assert outcome(top, 1) == "every pod restarted, counted (limit 7)"
    policy = top["spec"]["failurePolicy"]
    assert [r["action"] for r in policy["rules"] if "DeadlineExceeded" in r["onJobFailureReasons"]] == ["FailJobSet"]  # fmt: skip
    assert policy["restartStrategy"] == "BlockingRecreate"  # no new rank 0 while an old one runs
    assert top["spec"]["replicatedJobs"][0]["template"]["spec"]["activeDeadlineSeconds"] == 3600


def test_a_trainjob_carries_no_failure_policy_its_runtime_does():
    top = top_object(rendered(nodes=4, kind="trainjob"))
    assert top["spec"]["runtimeRef"] == {"name": "torch-distributed"}
    text = yaml.safe_dump(top)
    assert "podFailurePolicy" not in text and "failurePolicy" not in text and "backoffLimit" not in text


def known_fields(sent, parsed, path: str = "") -> list[str]:
    """Where `sent` has a field that the model `parsed` it into dropped (an unknown or misspelled field)
    or changed; fields the model adds (its defaults) are fine."""
    if isinstance(sent, dict):
        return [
            problem
            for key, value in sent.items()
            for problem in (
                known_fields(value, parsed[key], f"{path}.{key}") if key in parsed else [f"{path}.{key}"]
            )
        ]
    if isinstance(sent, list) and len(sent) == len(parsed):
        return [p for i, (a, b) in enumerate(zip(sent, parsed, strict=True)) for p in known_fields(a, b, f"{path}[{i}]")]  # fmt: skip
    return [] if sent == parsed else [f"{path}: {sent!r} -> {parsed!r}"]


EVERY_OPTION = {
    "gpus_per_node": 8,
    "image": "registry.example.com/ftjob:0.2",
    "namespace": "ml",
    "queue": "team-a",
    "tolerations": ["dedicated=ml:NoSchedule"],
    "node_selector": ["pool=h100"],
    "service_account": "trainer",
    "active_deadline_seconds": 86400,
    "env": ["LOG_LEVEL=debug"],
    "spool_claim": "ftjob-spool",
}


@pytest.mark.parametrize("nodes", [1, 4])
def test_the_jobset_fits_the_jobset_api_and_its_job_the_newest_kubernetes_schema(nodes):
    top = top_object(rendered(nodes=nodes, kind="jobset", priority_class="training", **EVERY_OPTION))
    assert known_fields(top, JobsetV1alpha2JobSet.from_dict(top).to_dict()) == []
    misspelled = copy.deepcopy(top)
    misspelled["spec"]["failurePolicy"]["rules"][0]["onJobFailureReason"] = ["PodFailurePolicy"]
    assert known_fields(misspelled, JobsetV1alpha2JobSet.from_dict(misspelled).to_dict()) == [
        ".spec.failurePolicy.rules[0].onJobFailureReason"
    ]
    (replicated,) = top["spec"]["replicatedJobs"]
    child = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"}, "spec": replicated["template"]["spec"]}  # fmt: skip
    kubernetes_validate.validate(child, kubernetes_validate.latest_version(), strict=True)
    rule_name = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")  # the JobSet CRD's pattern
    assert all(rule_name.match(rule["name"]) for rule in top["spec"]["failurePolicy"]["rules"])


def test_the_trainjob_fits_the_trainer_api():
    top = top_object(rendered(nodes=4, kind="trainjob", **EVERY_OPTION))
    assert known_fields(top, TrainerV1alpha1TrainJob.from_dict(top).to_dict()) == []
    trainer = top["spec"]["trainer"]
    assert trainer["numNodes"] == 4 and trainer["image"] == "registry.example.com/ftjob:0.2"
    assert trainer["command"] == ["ftjob"] and trainer["args"][:2] == ["run", "/spec/spec.json"]
    assert not {"PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"} & set(env_of(trainer))  # the trainer's own  # fmt: skip
    (patch,) = top["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert {v["name"] for v in pod["volumes"]} == {"spec", "work", "tmp", "home", "dshm", "spool"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["nodeSelector"] == {"pool": "h100"}
    assert pod["containers"][0]["name"] == node["name"] == "node"  # the runtime's container
    assert {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]} >= {"/spec", "/dev/shm", "/spool"}


@pytest.mark.parametrize("kind", ["job", "jobset", "trainjob"])
def test_kueue_admits_the_top_object_of_every_kind(kind):
    objects = rendered(nodes=2, kind=kind, queue="team-a")
    labelled = [o["kind"] for o in objects if "kueue.x-k8s.io/queue-name" in o["metadata"]["labels"]]
    assert labelled == [top_object(objects)["kind"]]
    assert top_object(objects)["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert not any("kueue" in str(o["metadata"]) for o in rendered(nodes=2, kind=kind))


def jobset_pod_env(top: dict) -> dict[str, dict]:
    if top["kind"] == "TrainJob":
        return env_of(top["spec"]["trainer"])
    (container,) = top["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"]
    return env_of(container)


@pytest.mark.parametrize("kind", ["jobset", "trainjob"])
def test_every_node_meets_pod_0_of_the_jobset_and_restarts_once_per_job(kind):
    spec = validate_spec({**example_spec().model_dump(mode="json"), "name": "Support_Bot"})
    top = top_object(render([spec], K8sOptions(nodes=3, kind=kind)))
    name, env = top["metadata"]["name"], jobset_pod_env(top)
    if kind == "jobset":  # JobSet's DNS: <jobset>-<replicated job>-<job index>-<pod index>.<subdomain>
        (replicated,) = top["spec"]["replicatedJobs"]
        subdomain = top["spec"]["network"].get("subdomain", name)
        assert top["spec"]["network"]["enableDNSHostnames"] is True
        assert env["MASTER_ADDR"]["value"] == f"{name}-{replicated['name']}-0-0.{subdomain}"
        assert replicated["replicas"] == 1 and replicated["template"]["spec"]["completions"] == 3
    else:  # the trainer's own PET_MASTER_ADDR
        assert env["MASTER_ADDR"]["value"] == f"{name}-node-0-0.{name}" == "support-bot-node-0-0.support-bot"
    assert env["NNODES"]["value"] == "3"
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"].endswith("['batch.kubernetes.io/job-completion-index']")  # fmt: skip
    # a JobSet makes its Jobs anew at each restart; its uid stays, so --restart starts over once
    assert env["FTJOB_RESTART_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['jobset.sigs.k8s.io/jobset-uid']"  # fmt: skip
    assert not of_kind(render([spec], K8sOptions(nodes=3, kind=kind)), "Service")  # the JobSet makes it


@pytest.mark.parametrize("kind", ["jobset", "trainjob"])
def test_long_names_keep_every_pod_name_within_63_characters(kind):
    spec = validate_spec({**example_spec().model_dump(mode="json"), "name": "x" * 80})
    name = top_object(render([spec], K8sOptions(nodes=9999, kind=kind)))["metadata"]["name"]
    assert len(f"{name}-node-0-9998-abcde") <= 63


def launch(capsys, *args: str) -> list[dict]:
    capsys.readouterr()
    assert launch_main(["k8s", *args]) == 0
    return list(yaml.safe_load_all(capsys.readouterr().out))


def test_the_kind_defaults_to_a_job_for_one_node_and_a_jobset_for_several(tmp_path, capsys):
    spec = str(example_spec_file(tmp_path))
    assert [o["kind"] for o in launch(capsys, spec)] == ["ConfigMap", "Job"]
    assert [o["kind"] for o in launch(capsys, spec, "--nodes", "2")] == ["ConfigMap", "JobSet"]
    assert [o["kind"] for o in launch(capsys, spec, "--nodes", "2", "--kind", "job")] == ["ConfigMap", "Service", "Job"]  # fmt: skip
    (trainjob,) = of_kind(launch(capsys, spec, "--kind", "trainjob", "--runtime", "ftjob-torch"), "TrainJob")
    assert trainjob["spec"]["runtimeRef"] == {"name": "ftjob-torch"}
    jobset = top_object(launch(capsys, spec, "--nodes", "2", "--max-restarts", "5", "--ttl-seconds", "60"))
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] == 5 and jobset["spec"]["ttlSecondsAfterFinished"] == 60  # fmt: skip


@pytest.mark.parametrize(
    "args,refused",
    [
        (["--kind", "job", "--max-restarts", "2"], "--max-restarts does not apply to --kind job"),
        (["--nodes", "2", "--backoff-limit", "2"], "--backoff-limit does not apply to --kind jobset"),
        (["--kind", "jobset", "--runtime", "r"], "--runtime does not apply to --kind jobset"),
        (["--kind", "trainjob", "--secret", "s3"], "--secret does not apply to --kind trainjob"),
        (
            ["--kind", "trainjob", "--priority-class", "p"],
            "--priority-class does not apply to --kind trainjob",
        ),  # fmt: skip
        (["--kind", "trainjob", "--ttl-seconds", "60"], "--ttl-seconds does not apply to --kind trainjob"),
    ],
)
def test_an_option_the_kind_cannot_express_is_refused_not_dropped(tmp_path, args, refused):
    with pytest.raises(UserError, match=re.escape(refused)):
        launch_main(["k8s", str(example_spec_file(tmp_path)), *args])
