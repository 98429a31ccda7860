"""k8s/'s kustomizations, built by `kubectl kustomize`, are what `ftjob launch k8s` renders."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from k8s_helpers import K8S, of_kind, rendered


def kustomize(directory: Path) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the kustomize build of k8s/ is not checked on this machine")
    built = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True
    )
    return list(yaml.safe_load_all(built.stdout))


def without_kustomize_labels(obj: dict) -> dict:
    obj = json.loads(json.dumps(obj))
    for meta in (obj["metadata"], obj.get("spec", {}).get("template", {}).get("metadata", {})):
        for label in ("app.kubernetes.io/component",):
            meta.get("labels", {}).pop(label, None)
    return obj


@pytest.mark.parametrize("directory,nodes", [("base", 1), ("overlays/multi-node", 4)])
def test_the_kustomizations_build_what_launch_renders(directory, nodes):
    built = sorted((without_kustomize_labels(o) for o in kustomize(K8S / directory)), key=lambda o: o["kind"])
    expected = sorted(rendered(nodes=nodes, gpus_per_node=1), key=lambda o: o["kind"])
    assert built == expected


def test_the_spool_overlay_is_the_base_with_a_claim_for_the_spool():
    built = sorted(
        (without_kustomize_labels(o) for o in kustomize(K8S / "overlays" / "spool")), key=lambda o: o["kind"]
    )
    claims = of_kind(built, "PersistentVolumeClaim")
    assert [c["metadata"]["name"] for c in claims] == ["ftjob-spool"]
    kubernetes_validate.validate(claims[0], kubernetes_validate.latest_version(), strict=True)
    expected = sorted(rendered(gpus_per_node=1, spool_claim="ftjob-spool"), key=lambda o: o["kind"])
    assert [o for o in built if o["kind"] != "PersistentVolumeClaim"] == expected
