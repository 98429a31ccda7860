"""What the Kubernetes tests share: k8s/'s example spec and objects, and what launch renders of them."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from helpers import REPO

from job.spec import validate_spec
from launch.k8s import K8sOptions, render

K8S = REPO / "k8s"


def file_objects(directory: Path) -> list[dict]:
    """The Kubernetes objects in a folder's YAML files (kustomization files are kustomize's)."""
    found = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def example_spec():
    config_map = next(o for o in file_objects(K8S / "base") if o["kind"] == "ConfigMap")
    return validate_spec(json.loads(config_map["data"]["spec.json"]))


def rendered(**options) -> list[dict]:
    return render([example_spec()], K8sOptions(**options))


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def example_spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(example_spec().model_dump(mode="json")))
    return path


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def the_container(job: dict) -> dict:
    return next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == "ftjob")
