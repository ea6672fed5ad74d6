"""deploy/k8s: valid against the Kubernetes schemas (kubernetes-validate, offline) and shaped for a
Jetson fleet on k3s."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

from tests.deploy.promql import DEPLOY_DIR

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate not installed (pip install kubernetes-validate, in the [dev] extra)"
)

K8S_DIR = DEPLOY_DIR / "k8s"
# k3s releases current for JetPack 5 boards; the schemas ship inside kubernetes-validate.
KUBERNETES_VERSION = "1.30.0"


def _documents() -> List[Dict[str, Any]]:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    documents: List[Dict[str, Any]] = []
    for name in kustomization["resources"]:
        documents.extend(doc for doc in yaml.safe_load_all((K8S_DIR / name).read_text()) if doc)
    return documents


def _by_kind(kind: str) -> Dict[str, Any]:
    (found,) = [doc for doc in _documents() if doc["kind"] == kind]
    return found


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())["resources"])
    on_disk = {path.name for path in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("document", _documents(), ids=lambda d: "{}/{}".format(d["kind"], d["metadata"]["name"]))
def test_manifest_validates(document: Dict[str, Any]) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_validation_rejects_a_misspelt_field() -> None:
    daemonset = copy.deepcopy(_by_kind("DaemonSet"))
    daemonset["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz", "port": 8000}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)


def test_daemonset_for_jetson_nodes() -> None:
    daemonset = _by_kind("DaemonSet")
    pod = daemonset["spec"]["template"]
    spec = pod["spec"]
    assert spec["nodeSelector"]["anemia-screening/jetson"] == "true"
    assert spec["runtimeClassName"] == _by_kind("RuntimeClass")["metadata"]["name"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    (container,) = spec["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # HTTPS by default: every probe speaks it, and the credentials persist on the node
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS", probe
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    config = _by_kind("ConfigMap")["data"]
    assert volumes["engines"]["hostPath"]["path"] == mounts["engines"] == config["ANEMIA_ENGINE_DIR"]
    assert volumes["credentials"]["hostPath"]["path"] == mounts["credentials"] == config["ANEMIA_CREDENTIALS_DIR"]
    assert pod["metadata"]["annotations"]["prometheus.io/scheme"] == "https"
    # the engine is built by an init container with the same image and settings before serving
    prepare = [c for c in spec["initContainers"] if c["name"] == "prepare"][0]
    assert prepare["args"] == ["prepare"] and prepare["image"] == container["image"]
    assert prepare["envFrom"] == container["envFrom"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(container["ports"][0]["containerPort"])
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_kustomize_image_matches_the_daemonset() -> None:
    image = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())["images"][0]
    container = _by_kind("DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "{}:{}".format(image["name"], image["newTag"])
