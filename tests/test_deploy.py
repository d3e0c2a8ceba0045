"""The Kubernetes manifests under deploy/k8s: valid against the Kubernetes schemas (offline, strict), and
saying what the design asks: egress locked by an init container with NET_ADMIN and nothing else, the CA
key and the master key only the sidecar's, the worker given its proxy and the CA for every runtime."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml

from conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
CA_ENV = ("NODE_EXTRA_CA_CERTS", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "DENO_CERT")


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=[str(p.relative_to(K8S)) for p in MANIFESTS])
def test_every_manifest_is_valid(path):
    for doc in docs(path):
        kubernetes_validate.validate(doc, "1.37", strict=True)


def test_every_kustomization_names_files_that_exist():
    for k in K8S.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(k.read_text())["resources"]:
            assert (k.parent / resource).is_file(), f"{k}: {resource}"


def _pod():
    [pod] = docs(K8S / "sidecar" / "worker-pod.yaml")
    return pod["spec"], {c["name"]: c for c in pod["spec"]["containers"]}


def test_the_sidecar_pod_locks_egress_and_keeps_the_keys_to_the_sidecar():
    spec, containers = _pod()
    proxy_uid = containers["sealgate"]["securityContext"]["runAsUser"]
    image_uid = int(re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.M).group(1))
    [init] = spec["initContainers"]
    assert init["command"] == ["sealgate", "egress-lock", "--proxy-uid", str(proxy_uid), "--allow-dns"]
    assert proxy_uid == image_uid  # (no --allow-cidr of the Service range: the API server is in it)
    caps = init["securityContext"]["capabilities"]
    assert caps == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    worker, sidecar = containers["worker"], containers["sealgate"]
    assert worker["securityContext"]["runAsUser"] != proxy_uid
    assert worker["securityContext"]["runAsGroup"] != proxy_uid and "fsGroup" not in spec["securityContext"]
    assert all(not c["image"].endswith(":latest") for c in [*containers.values(), init])
    secret_volumes = {v["name"] for v in spec["volumes"] if "secret" in v}
    assert not {m["name"] for m in worker.get("volumeMounts", [])} & secret_volumes  # no CA key for the worker
    assert not [e for e in worker["env"] if "secretKeyRef" in e.get("valueFrom", {})
                and e["valueFrom"]["secretKeyRef"]["name"] != "worker-session"]  # nor the master key
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert {"HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", *CA_ENV} <= set(env)
    assert {env[k] for k in CA_ENV} == {"/etc/sealgate-ca/mitmproxy-ca-cert.pem"}
    for c in (sidecar, worker):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"] and sc["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["limits"] and c["resources"]["requests"]
    assert [p["containerPort"] for p in sidecar["ports"]] == [8080]  # dashboard, API, probes: not exposed
    assert "livenessProbe" in sidecar and "readinessProbe" in sidecar


def test_the_gateway_is_reached_only_by_workers():
    deployment, service, policy, workers = docs(K8S / "gateway" / "deployment.yaml")
    assert workers["spec"]["policyTypes"] == ["Egress"] and len(workers["spec"]["egress"]) == 2
    assert [p["port"] for p in service["spec"]["ports"]] == [8080]
    [rule] = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"sealgate.io/worker": "true"}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] and "readinessProbe" in c


def test_kubernetes_waits_for_a_graceful_stop():
    """preStop, then SIGTERM: sealgate's shutdown grace and its audit flush fit in the pod's grace period."""
    from sealgate.addon import AUDIT_FLUSH
    [gateway, *_] = docs(K8S / "gateway" / "deployment.yaml")
    [pod] = docs(K8S / "sidecar" / "worker-pod.yaml")
    for spec in (gateway["spec"]["template"]["spec"], pod["spec"]):
        [sidecar] = [c for c in spec["containers"] if c["name"] == "sealgate"]
        grace = int({e["name"]: e.get("value") for e in sidecar["env"]}["SEALGATE_SHUTDOWN_GRACE"])
        pre_stop = sidecar["lifecycle"]["preStop"]["exec"]["command"]
        slept = float(re.search(r"sleep\((\d+)\)", pre_stop[-1]).group(1))
        assert slept + grace + AUDIT_FLUSH < spec["terminationGracePeriodSeconds"]
