"""The Kubernetes manifests in deploy/k8s: what the kustomization names exists, every resource
is valid against the Kubernetes schema (kubernetes-validate, offline), the references between
resources hold, and the dashboard and alert rules name metrics the code exports.

kubectl and kubeconform are not installable from PyPI or Debian's archive, so the kustomization
is rendered here (resources, namespace, generated ConfigMaps) rather than by ``kubectl
kustomize``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import REGISTRY

# Imported for the metrics they register.
import services.api.observability
import services.api.ratelimit
import services.scorer.observability  # noqa: F401

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31"


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization() -> dict[str, Any]:
    return _documents(K8S / "kustomization.yaml")[0]


def _rendered() -> list[dict[str, Any]]:
    """What ``kubectl kustomize deploy/k8s`` gives for this kustomization's features."""
    kustomization = _kustomization()
    resources = [d for name in kustomization["resources"] for d in _documents(K8S / name)]
    for generator in kustomization.get("configMapGenerator", []):
        data = {}
        for entry in generator["files"]:
            key, _, file = entry.partition("=")
            data[key] = (K8S / file).read_text()
        resources.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": generator["name"],
                    "labels": generator.get("options", {}).get("labels", {}),
                },
                "data": data,
            }
        )
    for resource in resources:
        if resource["kind"] != "Namespace":
            resource["metadata"]["namespace"] = kustomization["namespace"]
    return resources


def _all_manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in _documents(path)
    ]


def test_kustomization_names_files_that_exist() -> None:
    kustomization = _kustomization()
    assert kustomization["kind"] == "Kustomization"
    for name in kustomization["resources"]:
        assert (K8S / name).is_file(), name
    for generator in kustomization["configMapGenerator"]:
        for entry in generator["files"]:
            assert (K8S / entry.partition("=")[2]).is_file(), entry
    listed = set(kustomization["resources"])
    left_out = {p.name for p in K8S.glob("*.yaml")} - listed - {"kustomization.yaml"}
    # Left out on purpose, and said so in the kustomization's comment.
    assert left_out == {"secret.example.yaml", "migrate-job.yaml"}


@pytest.mark.parametrize(("file", "manifest"), _all_manifests(), ids=lambda v: str(v)[:40])
def test_every_manifest_is_valid_kubernetes(file: str, manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_rendered_resources_are_valid_and_in_one_namespace() -> None:
    rendered = _rendered()
    kinds = sorted(r["kind"] for r in rendered)
    assert kinds.count("Deployment") == 2
    assert kinds.count("ConfigMap") == 3
    for resource in rendered:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == "kam"


def _pod(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_references_between_resources_hold() -> None:
    rendered = _rendered()
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rendered:
        by_kind.setdefault(r["kind"], {})[r["metadata"]["name"]] = r
    deployments = by_kind["Deployment"]
    secrets = {d["metadata"]["name"] for d in _documents(K8S / "secret.example.yaml")}
    image = _kustomization()["images"][0]["name"]

    for deployment in deployments.values():
        template = deployment["spec"]["template"]
        assert _labels_match(
            deployment["spec"]["selector"]["matchLabels"], template["metadata"]["labels"]
        )
        for container in template["spec"]["containers"]:
            assert container["image"].rpartition(":")[0] == image
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in by_kind["ConfigMap"]
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in container, f"{deployment['metadata']['name']}: no {probe}"
                port = container[probe]["httpGet"]["port"]
                assert port in ports or port in ports.values()
            annotations = template["metadata"].get("annotations", {})
            assert int(annotations["prometheus.io/port"]) in ports.values()

    scorer = deployments["kam-scorer"]["spec"]["template"]["spec"]["containers"][0]
    assert scorer["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert scorer["livenessProbe"]["httpGet"]["path"] == "/healthz"

    for service in by_kind["Service"].values():
        targets = [
            d
            for d in deployments.values()
            if _labels_match(
                service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"]
            )
        ]
        assert len(targets) == 1, service["metadata"]["name"]
        names = {
            p["name"]
            for c in targets[0]["spec"]["template"]["spec"]["containers"]
            for p in c["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names

    for hpa in by_kind["HorizontalPodAutoscaler"].values():
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    for pdb in by_kind["PodDisruptionBudget"].values():
        assert any(
            _labels_match(
                pdb["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"]
            )
            for d in deployments.values()
        )


def _exported_metrics() -> set[str]:
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    names = set()
    for metric in REGISTRY.collect():
        names.add(metric.name)
        names.update(metric.name + suffix for suffix in suffixes.get(metric.type, []))
    return names


def _named_metrics(text: str) -> set[str]:
    return set(re.findall(r"\bkam_[a-z_]+", text))


def test_dashboard_and_alerts_name_metrics_that_exist() -> None:
    exported = _exported_metrics()
    dashboard = json.loads((K8S / "observability" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 12
    alerts = yaml.safe_load((K8S / "observability" / "prometheus-alerts.yaml").read_text())
    rules = [rule for group in alerts["groups"] for rule in group["rules"]]
    for rule in rules:
        assert rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"]
    named = _named_metrics(" ".join(exprs)) | _named_metrics(" ".join(r["expr"] for r in rules))
    unknown = sorted(named - exported)
    assert unknown == []
    # What the operators asked to be alerted on.
    text = " ".join(r["expr"] for r in rules)
    for needed in (
        "kam_dirty_oldest_age_seconds",
        "kam_webhook_oldest_pending_age_seconds",
        "kam_portfolio_pass_last_success_timestamp_seconds",
        'status=~"5.."',
    ):
        assert needed in text
