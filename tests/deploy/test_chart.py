"""The Helm chart without a cluster: render every ci/ values file with Helm's own library,
validate every manifest against Kubernetes' schemas (strict), lint, and check what matters.
The PrometheusRule, which kubernetes-validate has no schema for, is checked in test_alerts.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import helm_python as helm  # a dev dependency: missing means a broken set-up, not a skip
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "hopgate"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
KUBE_VERSION = "1.33.0"
# custom resources with no schema in kubernetes-validate: checked by shape below, skipped there
CUSTOM = {("monitoring.coreos.com/v1", "ServiceMonitor"),
          ("monitoring.coreos.com/v1", "PrometheusRule")}


def render(values: dict) -> list[dict]:
    out = helm.Chart.load(str(CHART)).render(values, name="t", namespace="ns")
    docs = []
    for text in out.values():
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module", params=CI_VALUES, ids=lambda p: p.stem)
def rendered(request):
    return request.param.stem, render(yaml.safe_load(request.param.read_text()) or {})


def test_ci_values_files_exist():
    assert {p.stem for p in CI_VALUES} >= {"standalone", "sidecar", "full", "initcontainer"}


def test_manifests_validate_strictly(rendered, tmp_path):
    name, docs = rendered
    files = []
    for i, d in enumerate(docs):
        if (d["apiVersion"], d["kind"]) in CUSTOM:
            continue  # explicitly skipped: no schema shipped for this custom resource
        f = tmp_path / f"{i}-{d['kind']}.yaml"
        f.write_text(yaml.safe_dump(d))
        files.append(str(f))
    exe = shutil.which("kubernetes-validate") or str(
        Path(__import__("sys").executable).parent / "kubernetes-validate")
    r = subprocess.run([exe, "--strict", "-k", KUBE_VERSION, *files], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_servicemonitor_shape():
    docs = render({"serviceMonitor": {"enabled": True}})
    (sm,) = by_kind(docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0] == {"port": "http", "path": "/metrics", "interval": "15s"}


def test_lint_is_clean():
    for values in CI_VALUES:
        report = helm.lint(str(CHART), yaml.safe_load(values.read_text()), strict=True)
        assert not report["errors"]
        assert all(m["severity"] < 2 for m in report["messages"]), report["messages"]


def test_sidecar_puts_hopgate_beside_the_classifier_and_the_service_goes_through_the_gate():
    docs = render(yaml.safe_load((CHART / "ci" / "sidecar.yaml").read_text()))
    (dep,) = by_kind(docs, "Deployment")
    containers = {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}
    assert set(containers) == {"hopgate", "classifier"}
    env = {e["name"]: e.get("value") for e in containers["hopgate"]["env"]}
    assert env["HOPGATE_UPSTREAM_URL"] == "http://127.0.0.1:9000/predict"
    assert env["HOPGATE_UPSTREAM_POLICY"] == "fail_open"
    assert json.loads(env["HOPGATE_PROXY_ROUTES"]) == ["/predict", "/v1/classify"]
    assert env["HOPGATE_GATE_MODE"] == "shadow"
    (svc,) = by_kind(docs, "Service")
    hop_ports = {p["name"] for p in containers["hopgate"]["ports"]}
    classifier_ports = {p["name"] for p in containers["classifier"]["ports"]}
    ports = {p["port"]: p["targetPort"] for p in svc["spec"]["ports"]}
    # the classifier's own port number on the Service goes to the gate, as does port 80;
    # hopgate's own endpoints have the admin port (sidecar/passthrough.py)
    assert ports == {80: "http", 9000: "http", 9901: "admin"}
    assert all(t in hop_ports and t not in classifier_ports for t in ports.values())
    assert {p["name"]: p["containerPort"] for p in containers["hopgate"]["ports"]} == {
        "http": 8000, "admin": 9901}
    assert env["HOPGATE_ADMIN_PORT"] == "9901"


def test_sidecar_probes_and_metrics_use_the_admin_port():
    """Mutation caught: a probe or the ServiceMonitor left on the data port, where the
    classifier's own /readyz or /metrics (or its 404) would answer instead of hopgate's."""
    docs = render(yaml.safe_load((CHART / "ci" / "sidecar.yaml").read_text()))
    (dep,) = by_kind(docs, "Deployment")
    (hop,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "hopgate"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert hop[probe]["httpGet"]["port"] == "admin"
    (sm,) = by_kind(docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "admin"
    (svc,) = by_kind(docs, "Service")
    assert "admin" in {p["name"] for p in svc["spec"]["ports"]}
    docs = render({"serviceMonitor": {"enabled": True}})  # standalone: one port, as before
    (dep,) = by_kind(docs, "Deployment")
    (hop,) = dep["spec"]["template"]["spec"]["containers"]
    assert [p["name"] for p in hop["ports"]] == ["http"]
    assert hop["readinessProbe"]["httpGet"]["port"] == "http"
    assert by_kind(docs, "ServiceMonitor")[0]["spec"]["endpoints"][0]["port"] == "http"


def test_sidecar_ports_must_differ():
    values = yaml.safe_load((CHART / "ci" / "sidecar.yaml").read_text())
    values["adminPort"] = 9000  # the classifier's
    with pytest.raises(helm.HelmError, match="three different ports"):
        render(values)


def test_sidecar_env_is_what_the_service_reads(monkeypatch):
    """The rendered HOPGATE_* variables build valid Settings with the proxy switched on."""
    from hopgate.service.config import Settings

    docs = render(yaml.safe_load((CHART / "ci" / "sidecar.yaml").read_text()))
    (dep,) = by_kind(docs, "Deployment")
    (hop,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "hopgate"]
    for e in hop["env"]:
        monkeypatch.setenv(e["name"], e["value"])
    s = Settings()
    assert s.proxy_routes == ["/predict", "/v1/classify"] and s.proxy_methods == ["POST"]
    assert s.admin_port == 9901 and s.port == 8000
    assert s.gate_mode == "shadow" and s.gate_ood_status == 422 and s.drift_window == 1000


def test_probes_point_at_real_endpoints_and_grace_matches_drain():
    docs = render({"drainSeconds": 25, "preStopSeconds": 5})
    (dep,) = by_kind(docs, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    from hopgate.service.app import create_app

    paths = set(create_app().openapi()["paths"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in paths
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] == 5
    assert spec["terminationGracePeriodSeconds"] >= 5 + 25
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HOPGATE_DRAIN_SECONDS"] == "25"


def test_security_context_is_restricted(rendered):
    _, docs = rendered
    (dep,) = by_kind(docs, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"] and sc["runAsNonRoot"] is True
    hop = next(c for c in spec["containers"] if c["name"] == "hopgate")
    assert any(m["mountPath"] == "/tmp" for m in hop["volumeMounts"])  # writable /tmp
    assert any(v["name"] == "tmp" and "emptyDir" in v for v in spec["volumes"])


def test_gpu_api_key_and_model_volume():
    docs = render(yaml.safe_load((CHART / "ci" / "full.yaml").read_text()))
    (dep,) = by_kind(docs, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HOPGATE_API_KEY_FILE"] == "/var/run/hopgate/api-key"
    assert env["HOPGATE_MODEL"] == "/models/model.onnx"
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["api-key"]["secret"]["secretName"] == "hopgate-api-key"
    assert vols["model"]["persistentVolumeClaim"]["claimName"] == "hopgate-models"
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}


def test_dashboard_configmap_holds_the_panels():
    docs = render({})
    (cm,) = by_kind(docs, "ConfigMap")
    dash = json.loads(cm["data"]["hopgate.json"])
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in ("hopgate_ood_rate", "hopgate_score_bucket", "hopgate_request_seconds_bucket",
                   "hopgate_batch_size_bucket", "hopgate_requests_total",
                   "hopgate_score_drift_psi", "hopgate_score_drift_ks"):
        assert metric in exprs


@pytest.mark.parametrize("values,where", [
    ({"replicaCount": "two"}, "replicaCount"),
    ({"gpu": {"enabled": "yes"}}, "enabled"),
    ({"mode": "daemon"}, "mode"),
    ({"port": 99999}, "port"),
    ({"adminPort": 0}, "adminPort"),
    ({"settings": {"queueImages": 1.5}}, "queueImages"),
    ({"gate": {"mode": "audit"}}, "mode"),
    ({"classifier": {"routes": ["predict"]}}, "routes"),
    ({"alerts": {"oodRate": 2}}, "oodRate"),
])
def test_schema_rejects_wrong_types(values, where):
    with pytest.raises(helm.HelmError, match=where):
        helm.Chart.load(str(CHART)).validate_schema(values)
    helm.Chart.load(str(CHART)).validate_schema({})  # the defaults pass


def test_dockerfiles_are_hadolint_clean():
    exe = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    for f in sorted((ROOT / "docker").glob("*.Dockerfile")):
        r = subprocess.run([exe, str(f)], capture_output=True, text=True)
        assert r.returncode == 0, f"{f.name}: {r.stdout}{r.stderr}"
