"""`ftjob launch k8s`: render a spec as Kubernetes objects (and optionally create them).

One run is a ConfigMap holding the spec and, by --kind, one of:
- `job` (the default for one node): an Indexed Job of N pods, one per node (the completion index is the
  node rank; job/cluster.py reads it); with N > 1 a headless Service gives pod 0 the DNS name the others
  meet at;
- `jobset` (the default for several nodes): a JobSet (jobset.x-k8s.io) of one such Job, which gives the
  pods their DNS names and restarts every pod together after a failure;
- `trainjob`: a Kubeflow Trainer v2 TrainJob running ftjob's image and command on a training runtime
  (default `torch-distributed`), whose JobSet template decides what a failure does.
Each pod runs `ftjob run /spec/spec.json --nproc-per-node auto` (one worker per GPU of the pod).

What an exit does (docs/contracts.md, "Exit codes"). A pod's exit goes through its Job's
podFailurePolicy; a JobSet sees only why its Job failed (the Job's reason), never the exit code:
- 2, 3 (bad input, bad data): FailJob, reason PodFailurePolicy: the Job, or the JobSet, fails at once;
- 75 (checkpointed after SIGTERM) and a disruption (DisruptionTarget: eviction, preemption, a node
  drained or lost): Ignore: the pod is replaced and nothing is counted; every rank stops together
  after a signal, so every pod is replaced;
- 76 (a lost peer), with several nodes: Ignore too. It is what another pod's failure does to the
  survivors, so only that failure (the root cause) counts; were 76 to fail the Job, a survivor's 76
  could come first and hide a root cause that fails every time. With one node it counts: the
  worker that died was this pod's own;
- anything else counts: a Job of one node allows --backoff-limit failed pods; of several,
  --backoff-limit per node (backoffLimitPerIndex), and the Job fails as soon as one node is past it
  (maxFailedIndexes 0), rather than its peers cycling on 76; in a JobSet the Job allows none
  (backoffLimit 0, reason BackoffLimitExceeded) and the JobSet restarts every pod, at most
  --max-restarts times, the old pods gone before new ones start (BlockingRecreate).
A TrainJob cannot carry a failure policy (its runtime's JobSet template does), nor take a Secret's keys
as variables, nor a priority class or a time to live: those options are refused with --kind trainjob.

Credentials only by reference to Secrets. The spec is resolved here (FTJOB__ variables of this shell,
then --set) and the ConfigMap holds it whole: an `--env FTJOB__...` override, or a variable the container
sets itself, is refused, and the pod runs `ftjob run --env-overrides secrets`, so that a Secret's FTJOB__
keys (every key of a Secret becomes a variable of the pod) may set secret values of the spec, such as
storage_options credentials, and nothing else. A flag, not a variable: a Secret could set a variable
too. A sweep renders one ConfigMap and Job, JobSet or TrainJob (and Service) per point.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from job import __version__
from job.errors import EXIT_PEER_LOST, EXIT_REQUEUE, DataError, UserError
from job.spec import (
    CREDENTIAL_VALUE,
    URL_CREDENTIALS,
    Spec,
    env_overrides,
    flatten,
    is_secret_key,
    override_variable,
    public_dict,
)
from job.storage import is_local
from launch.sweep import Submission

SPEC_DIR = "/spec"
IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
PORT = 29500
UID = 10001  # the image's user (docker/Dockerfile)
SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|AUTH)", re.IGNORECASE)
# Writable paths of a pod whose root filesystem is read-only (the image keeps its state under these).
WRITABLE = {"work": "/work", "tmp": "/tmp", "home": "/home/ftjob"}
SPOOL_DIR = "/spool"
KINDS = ("job", "jobset", "trainjob")
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# A JobSet's (and a TrainJob's) one replicated Job; the Kubeflow Trainer names it so, and its container.
REPLICATED_JOB = "node"
# Kinds of custom resources (--apply creates them through the CustomObjectsApi): their plural.
CUSTOM_RESOURCES = {"JobSet": "jobsets", "TrainJob": "trainjobs"}
# Options a kind has no field for, and why: given, they are refused rather than dropped.
NOT_FOR_KIND = {
    "job": (("max_restarts", "runtime"), "--max-restarts is a JobSet's, --runtime a TrainJob's"),
    "jobset": (
        ("backoff_limit", "runtime"),
        "a JobSet counts its restarts (--max-restarts), not failed pods",
    ),
    "trainjob": (
        ("backoff_limit", "max_restarts", "ttl_seconds", "priority_class", "secrets"),
        "a TrainJob's runtime decides what a failure does and how long a finished job stays, and a "
        "TrainJob can take neither a priority class nor a Secret's keys as variables",
    ),
}
# What a TrainJob may set of the pod (the trainer's runtimePatches); the rest is its runtime's.
TRAINJOB_POD_FIELDS = ("securityContext", "terminationGracePeriodSeconds", "volumes", "tolerations", "nodeSelector", "serviceAccountName")  # fmt: skip


@dataclass
class K8sOptions:
    nodes: int = 1
    gpus_per_node: int = 0
    image: str = f"ftjob:{__version__}"
    namespace: str | None = None
    cpu: str = "4"
    memory: str = "32Gi"
    shm: str = "8Gi"
    disk: str = "100Gi"  # ephemeral storage: the writable folders (model cache, staging) and logs
    spool_claim: str | None = None  # a PersistentVolumeClaim for the MLflow spool
    secrets: list[str] = field(default_factory=lambda: ["ftjob-credentials"])  # envFrom, optional
    env: list[str] = field(default_factory=list)  # NAME=VALUE, never a secret
    node_selector: list[str] = field(default_factory=list)  # KEY=VALUE
    tolerations: list[str] = field(default_factory=list)  # KEY[=VALUE][:EFFECT]
    priority_class: str | None = None
    service_account: str | None = None
    queue: str | None = None  # Kueue's LocalQueue
    kind: str = "job"  # one of KINDS; the command's default is jobset for several nodes
    backoff_limit: int = 3  # job: failed pods (per node, with several) before the Job fails
    max_restarts: int = 3  # jobset: restarts of every pod after a failure that counts
    runtime: str = "torch-distributed"  # trainjob: its ClusterTrainingRuntime
    active_deadline_seconds: int | None = None
    ttl_seconds: int = 86400


HELP = "render (and --apply) Kubernetes objects"
DESCRIPTION = (
    "Render the spec as a ConfigMap and an Indexed Job of --nodes pods (plus a headless Service for several "
    "nodes), a JobSet or a TrainJob (--kind), restricted pod security, credentials from Secrets by "
    "reference; print them, write them (--output) or create them (--apply)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`ftjob launch k8s`'s own options (launch/cli.py adds the spec, --nodes, --gpus-per-node, --sweep)."""
    parser.add_argument(
        "--image",
        help=f"the image, pinned by tag or digest (default: ftjob:{__version__}, this ftjob's version)",
    )
    parser.add_argument("--namespace")
    parser.add_argument("--cpu", default="4", help="CPU request per pod")
    parser.add_argument("--memory", default="32Gi", help="memory request and limit per pod")
    parser.add_argument("--shm", default="8Gi", help="size of the memory-backed /dev/shm")
    parser.add_argument(
        "--disk",
        default="100Gi",
        help="ephemeral storage per pod: request, limit and size of each writable folder (model cache, staging)",
    )
    parser.add_argument(
        "--spool-claim",
        metavar="PVC",
        help="a PersistentVolumeClaim for the MLflow spool, so that records kept through a tracking outage "
        "outlive the pod (a later pod delivers them)",
    )
    parser.add_argument(
        "--secret",
        dest="secrets",
        action="append",
        metavar="NAME",
        help="a Secret whose keys become the pod's variables (default: ftjob-credentials, optional); its "
        "FTJOB__ keys may set only secret values of the spec (ftjob run --env-overrides secrets)",
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="a variable, never a secret"
    )
    parser.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--toleration", dest="tolerations", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]"
    )
    parser.add_argument("--priority-class")
    parser.add_argument("--service-account")
    parser.add_argument(
        "--queue",
        help="Kueue LocalQueue (the kueue.x-k8s.io/queue-name label of the Job, JobSet or TrainJob)",
    )
    parser.add_argument(
        "--kind",
        choices=KINDS,
        help="job: an Indexed Job (the default for one node); jobset: a JobSet, which restarts every pod "
        "together (the default for several nodes; needs JobSet in the cluster); trainjob: a Kubeflow "
        "Trainer v2 TrainJob",
    )
    parser.add_argument(
        "--backoff-limit",
        type=int,
        help="job: failed pods before the Job fails (default 3); with several nodes, per node",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        help="jobset: restarts of every pod after a failure other than a stop (75), a lost peer (76), a "
        "disruption or bad input (default 3)",
    )
    parser.add_argument("--runtime", help="trainjob: the ClusterTrainingRuntime (default torch-distributed)")
    parser.add_argument("--active-deadline-seconds", type=int)
    parser.add_argument(
        "--ttl-seconds", type=int, help="delete the finished Job or JobSet after this long (default 86400)"
    )
    parser.add_argument("--output", "-o", metavar="FILE", help="write the manifests here instead of stdout")
    parser.add_argument(
        "--apply", action="store_true", help="create them with your kubeconfig (server dry run first)"
    )
    parser.set_defaults(secrets=None)


def submit(args: argparse.Namespace, submission: Submission) -> int:
    """The objects of every spec: printed, written (--output) or created (--apply)."""
    if any(is_local(spec.output_uri) for spec in submission.specs):
        raise UserError(
            f"output.uri {submission.spec.output.uri}: a pod's local disk goes with the pod (checkpoints and "
            "the adapter with it); give object storage, e.g. s3://bucket/runs/{name}"
        )
    kind = args.kind or ("jobset" if args.nodes > 1 else "job")
    names, why = NOT_FOR_KIND[kind]
    unused = [name for name in names if getattr(args, name) is not None]
    if unused:
        flag = "--secret" if unused[0] == "secrets" else f"--{unused[0].replace('_', '-')}"
        raise UserError(f"{flag} does not apply to --kind {kind}: {why}")
    given = {name: getattr(args, name) for name in K8sOptions.__dataclass_fields__} | {"kind": kind}
    options = K8sOptions(**{name: value for name, value in given.items() if value is not None})
    for warning in k8s_warnings(submission.spec, options, len(submission.specs)):
        print(f"warning: {warning}", file=sys.stderr)
    objects = render(submission.specs, options)  # first: manifests that cannot be made leave no parent run
    if args.apply:
        objects = render(submission.specs, options, parent_run(submission))
    if args.output:
        Path(args.output).write_text(to_yaml(objects))
        print(f"wrote {len(objects)} objects to {args.output}")
    elif not args.apply:
        print(to_yaml(objects), end="")
    if args.apply:
        for name in apply(objects, options.namespace):
            print(f"created {name}")
    return 0


def parent_run(submission: Submission) -> str | None:
    """A tracked sweep's parent run, in the store the pods log to: MLFLOW_TRACKING_URI, reached from here
    too (without it the pods would log to a store inside each pod)."""
    if not submission.wants_parent_run:
        return None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        print("no MLflow parent run: MLFLOW_TRACKING_URI is unset here", file=sys.stderr)
        return None
    return submission.start_parent_run(os.environ["MLFLOW_TRACKING_URI"])


def object_name(spec_name: str, max_length: int = 52) -> str:
    """A DNS-1035 label from the spec's name (a Service's name starts with a letter), short enough for
    the pods' names (`<name>-<index>-<5 characters>` for a Job); a long one keeps a hash of the whole
    name, so names stay apart."""
    name = re.sub(r"[^a-z0-9-]+", "-", spec_name.lower()).strip("-")
    if not name[:1].isalpha():
        name = f"ftjob-{name}".rstrip("-")
    if len(name) > max_length:
        name = f"{name[: max_length - 9].rstrip('-')}-{hashlib.sha256(spec_name.encode()).hexdigest()[:8]}"
    return name


def render(specs: list[Spec], options: K8sOptions, parent_run_id: str | None = None) -> list[dict[str, Any]]:
    """The objects of every spec (one for a run, one per point for a sweep), in creation order."""
    # A JobSet's pods are `<name>-node-0-<index>-<5 characters>`: 7 characters more than a Job's.
    max_length = 52 if options.kind == "job" else 45
    names = [object_name(spec.name, max_length) for spec in specs]
    if len(set(names)) < len(names):
        raise UserError(f"two runs would get one Kubernetes name: {names}; give the spec a shorter name")
    objects = []
    for spec, name in zip(specs, names, strict=True):
        objects.append(config_map(name, spec, options))
        if options.kind == "job":
            if options.nodes > 1:
                objects.append(service(name, options))
            objects.append(job(name, spec, options, parent_run_id))
        elif options.kind == "jobset":
            objects.append(job_set(name, spec, options, parent_run_id))
        else:
            objects.append(train_job(name, spec, options, parent_run_id))
    return objects


def k8s_warnings(spec: Spec, options: K8sOptions, runs: int) -> list[str]:
    """What the rendering cannot check but a user should hear before the pods start (`runs`: Jobs
    rendered, one per sweep point)."""
    warnings = []
    if "@" not in options.image and options.image.rpartition("/")[2].partition(":")[2] in ("", "latest"):
        warnings.append(
            f"--image {options.image} is not pinned: a retried pod may pull another image; give a version tag "
            "or a digest"
        )
    named = {pair(item, "--env")[0] for item in options.env}
    if spec.tracking.enabled and "MLFLOW_TRACKING_URI" not in named:
        warnings.append(
            "no MLFLOW_TRACKING_URI in --env: unless a --secret sets it, the pods log to a sqlite file inside "
            "the pod and the runs are lost with it"
        )
    if spec.tracking.enabled and not options.spool_claim:
        warnings.append(
            "no --spool-claim: MLflow records kept through a tracking outage are lost with the pod"
        )
    if options.spool_claim and options.nodes * runs > 1:
        warnings.append(
            f"--spool-claim {options.spool_claim} is mounted by all {options.nodes * runs} pods: it must be "
            "ReadWriteMany (with ReadWriteOnce, pods on other nodes stay Pending)"
        )
    return warnings


def metadata(name: str, options: K8sOptions, **labels: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/name": "ftjob", **labels}}
    if options.namespace:
        meta["namespace"] = options.namespace
    return meta


def config_map(name: str, spec: Spec, options: K8sOptions) -> dict[str, Any]:
    data = spec.model_dump(mode="json")
    public = flatten(public_dict(spec))
    hidden = [key for key, value in flatten(data).items() if public.get(key) != value]
    if hidden:
        problems = "\n".join(f"  - {secret_in_spec(key)}" for key in hidden)
        raise UserError(f"secret-looking values in the spec would sit in a ConfigMap:\n{problems}")
    text = json.dumps(data, indent=2) + "\n"
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(f"{name}-spec", options), "data": {"spec.json": text}}  # fmt: skip


def secret_in_spec(key: str) -> str:
    """Where the secret value at `key` goes instead: the pods take from a Secret only keys whose values
    are secret (ftjob run --env-overrides secrets)."""
    if is_secret_key(key):
        return (
            f"{key}: put it in a Secret as {override_variable(key)} and pass --secret SECRET_NAME (its keys "
            "become the pod's variables)"
        )
    return (
        f"{key}: looks like a credential, which a pod cannot take from a Secret under this key; give the "
        "credentials in the environment (AWS_*, HF_TOKEN, ... in a Secret) or under storage_options"
    )


def service(name: str, options: K8sOptions) -> dict[str, Any]:
    """Headless: only DNS records, `<job>-<index>.<service>`, published before the pods are ready
    (the ranks meet before any readiness)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(name, options),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"batch.kubernetes.io/job-name": name},
            "ports": [{"name": "rendezvous", "port": PORT, "targetPort": PORT, "protocol": "TCP"}],
        },
    }


def top_object(
    api_version: str, kind: str, name: str, options: K8sOptions, body: dict[str, Any]
) -> dict[str, Any]:
    """The object that holds the run's pods (a Job, JobSet or TrainJob), with Kueue's queue label."""
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": metadata(name, options, **queue_label(options)),
        "spec": body,
    }


def job(name: str, spec: Spec, options: K8sOptions, parent_run_id: str | None) -> dict[str, Any]:
    body = job_spec(name, spec, options, parent_run_id)
    body["ttlSecondsAfterFinished"] = options.ttl_seconds
    return top_object("batch/v1", "Job", name, options, body)


def job_spec(name: str, spec: Spec, options: K8sOptions, parent_run_id: str | None) -> dict[str, Any]:
    """An Indexed Job's spec, a pod per node: a Job's own, or the one a JobSet replicates."""
    exits = {"containerName": "ftjob", "operator": "In"}
    gang = options.nodes > 1
    if options.kind == "jobset":
        limits = {"backoffLimit": 0}  # a failure that counts fails the Job; the JobSet restarts every pod
    elif gang:  # counted per node, and the Job fails once one node is past its limit
        limits = {"backoffLimitPerIndex": options.backoff_limit, "maxFailedIndexes": 0}
    else:
        limits = {"backoffLimit": options.backoff_limit}
    # 76 on one node: a worker of this very pod died, a root cause that counts
    ignored = [EXIT_REQUEUE, EXIT_PEER_LOST] if gang else [EXIT_REQUEUE]
    body: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": options.nodes,
        "parallelism": options.nodes,
        **limits,
        "podReplacementPolicy": "Failed",  # a replacement starts once the old pod has committed
        "podFailurePolicy": {
            "rules": [
                {"action": "FailJob", "onExitCodes": {**exits, "values": [UserError.exit_code, DataError.exit_code]}},
                {"action": "Ignore", "onExitCodes": {**exits, "values": ignored}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": {"metadata": {"labels": {"app.kubernetes.io/name": "ftjob"}}, "spec": pod(name, spec, options, parent_run_id)},
    }  # fmt: skip
    if options.active_deadline_seconds:
        body["activeDeadlineSeconds"] = options.active_deadline_seconds
    return body


def job_set(name: str, spec: Spec, options: K8sOptions, parent_run_id: str | None) -> dict[str, Any]:
    """One replicated Job of --nodes pods. The JobSet sees only why its Job failed: PodFailurePolicy
    (exit 2 or 3) and DeadlineExceeded (--active-deadline-seconds) fail it; BackoffLimitExceeded (any
    other failure that counts) restarts every pod, --max-restarts times at most. 75, 76 and disruptions
    never fail the Job: its pods are replaced (job_spec)."""
    body = {
        # pod i is <name>-node-0-i.<name>, from a headless Service of the JobSet's, before it is ready
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
        "failurePolicy": {
            "maxRestarts": options.max_restarts,
            "restartStrategy": "BlockingRecreate",  # the old pods are gone before the new ones start
            "rules": [
                {"name": "badInputOrDeadline", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy", "DeadlineExceeded"]},
                {"name": "otherFailure", "action": "RestartJobSet", "onJobFailureReasons": ["BackoffLimitExceeded"]},
            ],
        },
        "replicatedJobs": [
            {"name": REPLICATED_JOB, "replicas": 1, "template": {"spec": job_spec(name, spec, options, parent_run_id)}}
        ],
        "ttlSecondsAfterFinished": options.ttl_seconds,
    }  # fmt: skip
    return top_object("jobset.x-k8s.io/v1alpha2", "JobSet", name, options, body)


def train_job(name: str, spec: Spec, options: K8sOptions, parent_run_id: str | None) -> dict[str, Any]:
    """ftjob's container as a TrainJob's trainer, and what the trainer lets a TrainJob set of the pod
    (runtimePatches); the runtime's JobSet template gives the rest, its failure policy included."""
    whole_pod = pod(name, spec, options, parent_run_id)
    (ftjob,) = whole_pod["containers"]
    pod_patch = {key: whole_pod[key] for key in TRAINJOB_POD_FIELDS if key in whole_pod}
    pod_patch["containers"] = [
        {
            "name": REPLICATED_JOB,
            "securityContext": ftjob["securityContext"],
            "volumeMounts": ftjob["volumeMounts"],
        }
    ]
    node = {"name": REPLICATED_JOB, "template": {"spec": {"template": {"spec": pod_patch}}}}
    body: dict[str, Any] = {
        "runtimeRef": {"name": options.runtime},
        "trainer": {
            "image": ftjob["image"],
            "command": ftjob["command"],
            "args": ftjob["args"],
            "env": ftjob["env"],
            "numNodes": options.nodes,
            "resourcesPerNode": ftjob["resources"],
        },
        "runtimePatches": [
            {"manager": "ftjob/launch", "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node]}}}}
        ],
    }  # fmt: skip
    if options.active_deadline_seconds:
        body["activeDeadlineSeconds"] = options.active_deadline_seconds
    return top_object("trainer.kubeflow.org/v1alpha1", "TrainJob", name, options, body)


def queue_label(options: K8sOptions) -> dict[str, str]:
    """Kueue admits the top object of every kind by this label."""
    return {QUEUE_LABEL: options.queue} if options.queue else {}


def pod(name: str, spec: Spec, options: K8sOptions, parent_run_id: str | None) -> dict[str, Any]:
    tolerations = [toleration(t) for t in options.tolerations]
    if options.gpus_per_node:
        tolerations.insert(0, {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    body: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        # SIGTERM -> ftjob publishes a checkpoint and exits 75; this long before SIGKILL
        "terminationGracePeriodSeconds": int(spec.train.stop_grace_seconds) + 30,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container(name, options, parent_run_id)],
        "volumes": [
            {"name": "spec", "configMap": {"name": f"{name}-spec"}},
            *({"name": volume, "emptyDir": {"sizeLimit": options.disk}} for volume in WRITABLE),
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": options.shm}},
        ],
    }
    if options.spool_claim:
        body["volumes"].append({"name": "spool", "persistentVolumeClaim": {"claimName": options.spool_claim}})
    if options.kind == "job" and options.nodes > 1:
        body["subdomain"] = name  # a JobSet's pods get theirs from the JobSet
    optional = {
        "tolerations": tolerations,
        "nodeSelector": dict(pair(item, "--node-selector") for item in options.node_selector),
        "priorityClassName": options.priority_class,
        "serviceAccountName": options.service_account,
    }
    body.update({key: value for key, value in optional.items() if value})
    return body


def container(name: str, options: K8sOptions, parent_run_id: str | None) -> dict[str, Any]:
    gpus = {"nvidia.com/gpu": options.gpus_per_node} if options.gpus_per_node else {}
    # the object a user created (a JobSet's Jobs are made anew at each restart): its name, and its uid,
    # one for every pod and retry, so that `ftjob run --restart` starts over once per job
    owner = "batch.kubernetes.io/job-name", "batch.kubernetes.io/controller-uid"
    if options.kind != "job":  # a TrainJob runs as a JobSet of its name
        owner = "jobset.sigs.k8s.io/jobset-name", "jobset.sigs.k8s.io/jobset-uid"
    env = [
        {"name": "FTJOB_SPEC", "value": f"{SPEC_DIR}/spec.json"},
        {"name": "FTJOB_IMAGE", "value": options.image},
        field_env("JOB_NAME", f"metadata.labels['{owner[0]}']"),
        field_env("FTJOB_RESTART_ID", f"metadata.labels['{owner[1]}']"),
        field_env("NODE_RANK", "metadata.annotations['batch.kubernetes.io/job-completion-index']"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        {"name": "NNODES", "value": str(options.nodes)},
        {"name": "MASTER_PORT", "value": str(PORT)},
    ]
    if options.nodes > 1:
        pod_0 = f"$(JOB_NAME)-0.{name}" if options.kind == "job" else f"{name}-{REPLICATED_JOB}-0-0.{name}"
        env.append({"name": "MASTER_ADDR", "value": pod_0})
    if parent_run_id:
        env.append({"name": "FTJOB_PARENT_RUN_ID", "value": parent_run_id})
    if options.spool_claim:
        env.append({"name": "FTJOB_SPOOL_DIR", "value": SPOOL_DIR})
    set_here = {entry["name"] for entry in env}
    env += [literal_env(item, set_here) for item in options.env]
    spool = [{"name": "spool", "mountPath": SPOOL_DIR}] if options.spool_claim else []
    return {
        "name": "ftjob",
        "image": options.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["ftjob"],
        "args": ["run", f"{SPEC_DIR}/spec.json", "--nproc-per-node", "auto", "--env-overrides", "secrets"],
        "env": env,
        "envFrom": [{"secretRef": {"name": secret, "optional": True}} for secret in options.secrets],
        "ports": [{"name": "rendezvous", "containerPort": PORT}],
        "resources": {
            "requests": {
                "cpu": options.cpu,
                "memory": options.memory,
                "ephemeral-storage": options.disk,
                **gpus,
            },
            "limits": {"memory": options.memory, "ephemeral-storage": options.disk, **gpus},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
            *({"name": volume, "mountPath": path} for volume, path in WRITABLE.items()),
            {"name": "dshm", "mountPath": "/dev/shm"},
            *spool,
        ],
    }


def field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def literal_env(item: str, set_here: set[str]) -> dict[str, str]:
    """--env NAME=VALUE as the container's variable; never a credential, a spec override (the pod would
    apply it past the spec checked here) or a variable the container has already (set_here)."""
    name, value = pair(item, "--env")
    overrides = env_overrides({name: value})
    if overrides:
        raise UserError(
            f"--env {name}: a spec override, which the pod would apply past the spec checked here; pass "
            f"--set {overrides[0][0]}=VALUE instead"
        )
    if name in set_here:
        raise UserError(f"--env {name}: set by ftjob launch itself")
    if SECRET_NAME.search(name) or CREDENTIAL_VALUE.search(value) or URL_CREDENTIALS.search(value):
        raise UserError(
            f"--env {name}: looks like a credential; put it in a Secret and pass --secret SECRET_NAME "
            "(its keys become the pod's variables), never as a literal in the manifest"
        )
    return {"name": name, "value": value}


def pair(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UserError(f"{flag} {item!r}: expected KEY=VALUE")
    return key, value


def toleration(item: str) -> dict[str, str]:
    """KEY[=VALUE][:EFFECT] -> a toleration (Exists without a value, Equal with one)."""
    rest, _, effect = item.partition(":")
    key, sep, value = rest.partition("=")
    if not key or effect not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise UserError(
            f"--toleration {item!r}: expected KEY[=VALUE][:NoSchedule|PreferNoSchedule|NoExecute]"
        )
    result = {"key": key, "operator": "Equal" if sep else "Exists"}
    if sep:
        result["value"] = value
    if effect:
        result["effect"] = effect
    return result


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the spec in the ConfigMap) as literal blocks, readable in the manifest."""

    def represent_str(self, data: str) -> yaml.ScalarNode:
        return self.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_Dumper.add_representer(str, _Dumper.represent_str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=120)


def apply(objects: list[dict[str, Any]], namespace: str | None) -> list[str]:
    """Create the objects with the user's kubeconfig (in-cluster config inside a pod): all of them
    through a server-side dry run first, so that nothing is created when one would be refused."""
    try:
        from kubernetes import client, config, utils
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError
    except ImportError:
        raise UserError("--apply needs the Kubernetes client: pip install 'ftjob[k8s]'") from None

    try:
        try:
            config.load_kube_config()
            target = namespace or config.list_kube_config_contexts()[1]["context"].get("namespace", "default")
        except config.ConfigException:
            config.load_incluster_config()
            target = namespace or Path(IN_CLUSTER_NAMESPACE).read_text().strip()
        api = client.ApiClient()
        custom = client.CustomObjectsApi(api)
        for dry_run in ("All", None):
            for obj in objects:
                if obj["kind"] in CUSTOM_RESOURCES:  # create_from_dict knows only Kubernetes' own kinds
                    group, version = obj["apiVersion"].split("/")
                    plural = CUSTOM_RESOURCES[obj["kind"]]
                    custom.create_namespaced_custom_object(
                        group, version, target, plural, obj, dry_run=dry_run
                    )
                else:
                    utils.create_from_dict(api, obj, namespace=target, dry_run=dry_run)
    except (config.ConfigException, ApiException, utils.FailToCreateError, HTTPError, OSError) as e:
        # a 404 of a JobSet or TrainJob (create_from_dict reports its own as FailToCreateError)
        unknown = isinstance(e, ApiException) and e.status == 404
        hint = (
            "; is JobSet (or Kubeflow Trainer, for a TrainJob) installed? --kind job needs neither"
            if unknown
            else ""
        )
        raise UserError(f"cannot create the objects in Kubernetes: {type(e).__name__}: {e}{hint}") from None
    return [f"{obj['kind'].lower()}/{obj['metadata']['name']}" for obj in objects]
