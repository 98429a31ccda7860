"""k8s/overlays/jobset, built by `kubectl kustomize`, is what `ftjob launch k8s --nodes 4` renders."""

from __future__ import annotations

from k8s_helpers import K8S, rendered
from test_k8s_kustomize import kustomize, without_kustomize_labels


def test_the_jobset_overlay_builds_what_launch_renders_for_several_nodes():
    built = sorted((without_kustomize_labels(o) for o in kustomize(K8S / "overlays" / "jobset")), key=lambda o: o["kind"])  # fmt: skip
    assert [o["kind"] for o in built] == ["ConfigMap", "JobSet"]
    assert built == sorted(rendered(nodes=4, gpus_per_node=1, kind="jobset"), key=lambda o: o["kind"])
