"""Offline validation of k8s/ and the Dockerfile (issue 11 §4).

* Every kustomization's resources exist, and every manifest in k8s/ belongs to one.
* Core kinds are valid against the Kubernetes OpenAPI schemas shipped in `kubernetes-validate`
  (strict: unknown fields are errors), for the oldest Kubernetes the manifests target (1.29:
  native sidecars) and the newest the package knows.
* Custom resources (InferencePool, Gateway, HTTPRoute, ServiceMonitor, PodMonitor) by their
  required fields and the values they must hold.
* Each ConfigMap's pylb.yaml loads with pylb's own config loader (`pylb serve --print-config`).
* The wiring holds: probes on /health and /ready at the port pylb listens on, the config mount
  where --config points, RBAC for endpointslices get/list/watch bound to the pods' service
  account, the discovered Service exists, the security context (non-root, read-only root,
  no privilege escalation), the ServiceMonitor's port exists on the pylb Service.
* The Dockerfile: multi-stage, a non-root runtime with no compiler, carrying the runtime
  packages of every shared library the built extension links.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pylb import cli
from pylb.config import load_settings

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))

K8S_VERSIONS = ("1.29", "latest")
"""Kubernetes versions to validate against: the oldest supported (native sidecar containers are
on by default from 1.29) and the newest kubernetes-validate has schemas for."""

CUSTOM_REQUIRED: dict[tuple[str, str], list[str]] = {
    ("inference.networking.k8s.io/v1", "InferencePool"): ["spec.selector.matchLabels", "spec.targetPorts", "spec.endpointPickerRef.name"],
    ("gateway.networking.k8s.io/v1", "Gateway"): ["spec.gatewayClassName", "spec.listeners"],
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): ["spec.parentRefs", "spec.rules"],
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ["spec.selector", "spec.endpoints"],
    ("monitoring.coreos.com/v1", "PodMonitor"): ["spec.selector", "spec.podMetricsEndpoints"],
}
"""Required fields of the custom resources k8s/ uses (from their CRDs), by (apiVersion, kind)."""


def build(folder: Path) -> list[dict[str, Any]]:
    """The resources a kustomization lists (recursing into folders), each with `_file`; the
    kustomization's `namespace` applied to namespaced resources. (No patches are used in k8s/,
    so this is what `kustomize build` gives, less labels and image tags.)"""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    assert not {"patches", "patchesStrategicMerge", "patchesJson6902", "replacements"} & set(k), f"{folder}: build() does not apply patches"
    out: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        path = (folder / res).resolve()
        assert path.exists(), f"{folder}/kustomization.yaml: {res} does not exist"
        if path.is_dir():
            out += build(path)
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["_file"] = str(path.relative_to(REPO))
                out.append(doc)
    for gen in k.get("configMapGenerator", []):
        for f in gen.get("files", []):
            assert (folder / f).is_file(), f"{folder}: configMapGenerator file {f} does not exist"
    ns = k.get("namespace")
    if ns:
        for doc in out:
            if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
                doc.setdefault("metadata", {})["namespace"] = ns
    return out


def all_docs() -> list[dict[str, Any]]:
    seen: dict[tuple[str, str, str], dict[str, Any]] = {}
    for folder in KUSTOMIZATIONS:
        for doc in build(folder):
            seen[(doc["_file"], doc["kind"], doc["metadata"]["name"])] = doc
    return list(seen.values())


def get(doc: dict[str, Any], dotted: str) -> Any:
    cur: Any = doc
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def test_every_manifest_belongs_to_a_kustomization() -> None:
    assert {p.relative_to(K8S).as_posix() for p in KUSTOMIZATIONS} >= {"base", "examples/gateway", "examples/sidecar", "examples/gie", "monitoring"}
    listed = {d["_file"] for d in all_docs()}
    files = {str(p.relative_to(REPO)) for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files == listed, f"manifests in no kustomization: {sorted(files - listed)}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_kinds_are_valid_against_the_kubernetes_schemas(version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    from kubernetes_validate.utils import latest_version

    v = latest_version() if version == "latest" else version
    checked = 0
    for doc in all_docs():
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_REQUIRED:
            continue
        body = {k: val for k, val in doc.items() if k != "_file"}
        try:
            kv.validate(body, v, strict=True)
        except kv.ValidationError as exc:
            raise AssertionError(f"{doc['_file']}: {doc['kind']} {doc['metadata']['name']} invalid for Kubernetes {v}: {exc}") from None
        checked += 1
    assert checked >= 10


def test_custom_resources_have_their_required_fields() -> None:
    docs = all_docs()
    kinds = {(d["apiVersion"], d["kind"]) for d in docs}
    assert set(CUSTOM_REQUIRED) <= kinds
    for doc in docs:
        req = CUSTOM_REQUIRED.get((doc["apiVersion"], doc["kind"]))
        if req is None:
            continue
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        for field in req:
            assert get(doc, field) not in (None, [], {}), f"{doc['_file']}: {doc['kind']} lacks {field}"
        if doc["kind"] == "InferencePool":
            ports = doc["spec"]["targetPorts"]
            assert len(ports) == 1 and 1 <= ports[0]["number"] <= 65535  # v1 allows one port
            ref = doc["spec"]["endpointPickerRef"]
            assert ref.get("kind", "Service") == "Service" and ref["port"]["number"] == 9002
            assert ref.get("failureMode", "FailClose") in ("FailOpen", "FailClose")
            assert set(doc["spec"]) <= {"selector", "targetPorts", "endpointPickerRef"}
        if doc["kind"] == "Gateway":
            for lis in doc["spec"]["listeners"]:
                assert lis["name"] and lis["protocol"] in ("HTTP", "HTTPS", "TLS", "TCP", "UDP") and 1 <= lis["port"] <= 65535
        if doc["kind"] == "HTTPRoute":
            for rule in doc["spec"]["rules"]:
                for ref in rule["backendRefs"]:
                    assert ref["name"]
                    if ref.get("kind") == "InferencePool":
                        assert ref["group"] == "inference.networking.k8s.io"
        if doc["kind"] in ("ServiceMonitor", "PodMonitor"):
            eps = doc["spec"].get("endpoints") or doc["spec"].get("podMetricsEndpoints")
            assert all(e["port"] and e["path"] == "/metrics" for e in eps)


def _configmaps_with_pylb_yaml() -> list[dict[str, Any]]:
    return [d for d in all_docs() if d["kind"] == "ConfigMap" and "pylb.yaml" in d.get("data", {})]


def test_configmap_configs_load_with_pylbs_loader(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    cms = _configmaps_with_pylb_yaml()
    assert {c["metadata"]["name"] for c in cms} == {"pylb-config", "pylb-sidecar-config"}
    for k in list(os.environ):
        if k.startswith("PYLB_"):
            monkeypatch.delenv(k)
    for cm in cms:
        f = tmp_path / f"{cm['metadata']['name']}.yaml"
        f.write_text(cm["data"]["pylb.yaml"])
        assert cli.main(["serve", "--config", str(f), "--print-config"]) == 0, capsys.readouterr().err
        printed = tmp_path / "printed.yaml"
        printed.write_text(capsys.readouterr().out)
        s = load_settings(env={}, config_path=printed)
        assert s == load_settings(env={}, config_path=f)
        assert s.fleet.discovery in ("k8s", "dns") and not s.fleet.backends


def _pylb_containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container that runs the pylb image."""
    out = []
    for d in all_docs():
        if d["kind"] != "Deployment":
            continue
        spec = d["spec"]["template"]["spec"]
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            if c["image"].split(":")[0] == "pylb":
                out.append((d, c))
    return out


def test_pylb_pods_are_wired_and_locked_down() -> None:
    docs = all_docs()
    configs = {c["metadata"]["name"]: yaml.safe_load(c["data"]["pylb.yaml"]) for c in _configmaps_with_pylb_yaml()}
    serving = [(d, c) for d, c in _pylb_containers() if c["args"][0] == "serve"]
    assert len(serving) == 2  # the base Deployment (the gateway example uses it) and the sidecar
    for d, c in serving:
        spec = d["spec"]["template"]["spec"]
        where = f"{d['_file']} {c['name']}"
        # the config file --config names is the mounted ConfigMap's pylb.yaml
        path = c["args"][c["args"].index("--config") + 1]
        mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        cfg = configs[vol["configMap"]["name"]]
        port = cfg["server"]["port"]
        # probes: liveness on /health, readiness on /ready, at the port pylb listens on
        for probe, want in (("livenessProbe", "/health"), ("readinessProbe", "/ready"), ("startupProbe", "/health")):
            p = c[probe]
            if "httpGet" in p:
                assert p["httpGet"]["path"] == want, where
                named = {pp["name"]: pp["containerPort"] for pp in c.get("ports", [])}
                assert named.get(p["httpGet"]["port"], p["httpGet"]["port"]) == port, where
            else:  # a loopback-only sidecar probes from inside
                assert f"http://127.0.0.1:{port}{want}" in " ".join(p["exec"]["command"]), where
        # security: non-root, read-only root, no privilege escalation, no capabilities
        sc = c["securityContext"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0, where
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), where  # scratch space on a read-only root
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], where
        assert spec["terminationGracePeriodSeconds"] > cfg["server"].get("shutdown_timeout_s", 10), where
        if cfg["fleet"]["discovery"] == "k8s":
            _check_k8s_discovery_wiring(docs, d, cfg)


def _check_k8s_discovery_wiring(docs: list[dict[str, Any]], deployment: dict[str, Any], cfg: dict[str, Any]) -> None:
    """The pods' service account may get/list/watch endpointslices; the watched Service exists
    where the gateway example deploys it, with the port the config names."""
    sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert any(d["kind"] == "ServiceAccount" and d["metadata"]["name"] == sa for d in docs)
    bindings = [d for d in docs if d["kind"] == "RoleBinding" and any(s["kind"] == "ServiceAccount" and s["name"] == sa for s in d["subjects"])]
    granted = set()
    for b in bindings:
        role = next(d for d in docs if d["kind"] == b["roleRef"]["kind"] and d["metadata"]["name"] == b["roleRef"]["name"])
        for rule in role["rules"]:
            if "discovery.k8s.io" in rule["apiGroups"] and "endpointslices" in rule["resources"]:
                granted |= set(rule["verbs"])
    assert granted == {"get", "list", "watch"}
    gateway = build(K8S / "examples" / "gateway")
    name = cfg["discovery"]["k8s_service"]
    svc = next(d for d in gateway if d["kind"] == "Service" and d["metadata"]["name"] == name)
    assert cfg["discovery"]["k8s_port_name"] in [p["name"] for p in svc["spec"]["ports"]]


def test_sidecar_dns_name_is_the_headless_vllm_service() -> None:
    cfg = yaml.safe_load(next(c for c in _configmaps_with_pylb_yaml() if c["metadata"]["name"] == "pylb-sidecar-config")["data"]["pylb.yaml"])
    gateway = build(K8S / "examples" / "gateway")
    svc = next(d for d in gateway if d["kind"] == "Service" and d["metadata"]["name"] == "vllm")
    assert svc["spec"]["clusterIP"] == "None"  # headless: one A record per ready pod
    assert cfg["discovery"]["dns_name"] == f"vllm.{svc['metadata']['namespace']}.svc.cluster.local"
    assert cfg["discovery"]["port"] == svc["spec"]["ports"][0]["port"]


def test_monitors_select_what_exists() -> None:
    docs = all_docs()
    sm = next(d for d in docs if d["kind"] == "ServiceMonitor")
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "pylb")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in [p["name"] for p in svc["spec"]["ports"]]
    pm = next(d for d in docs if d["kind"] == "PodMonitor")
    vllm = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "vllm")
    assert pm["spec"]["selector"]["matchLabels"].items() <= vllm["spec"]["template"]["metadata"]["labels"].items()
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] in [p["name"] for p in vllm["spec"]["template"]["spec"]["containers"][0]["ports"]]


def test_gie_picker_runs_pylb_epp_wired_to_the_pool(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The pylb-epp Deployment runs `pylb epp` with arguments and a config that load; its gRPC
    port is the one the Service and the InferencePool's endpointPickerRef name; gRPC probes on
    GIE's health services; locked down like the other pylb pods."""
    for k in [k for k in os.environ if k.startswith("PYLB_")]:
        monkeypatch.delenv(k)
    gie = build(K8S / "examples" / "gie")
    (dep,) = [d for d in gie if d["kind"] == "Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["args"][0] == "epp"
    cfg = next(x for x in _configmaps_with_pylb_yaml() if x["metadata"]["name"] == "pylb-config")
    f = tmp_path / "pylb.yaml"
    f.write_text(cfg["data"]["pylb.yaml"])
    args = [a if a != "/etc/pylb/pylb.yaml" else str(f) for a in c["args"]]
    assert cli.main([*args, "--print-config"]) == 0, capsys.readouterr().err
    effective = yaml.safe_load(capsys.readouterr().out)
    grpc_port = effective["epp"]["grpc_port"]
    assert effective["server"]["host"] == "0.0.0.0"  # reachable from the Gateway's pods
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc-ext-proc"] == grpc_port and ports["http-metrics"] == effective["epp"]["metrics_port"]
    svc = next(d for d in gie if d["kind"] == "Service" and d["metadata"]["name"] == "pylb-epp")
    assert {p["targetPort"] for p in svc["spec"]["ports"] if p["name"] == "grpc-ext-proc"} == {grpc_port}
    pool = next(d for d in gie if d["kind"] == "InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == svc["metadata"]["name"] and ref["port"]["number"] in [p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc-ext-proc"]
    for probe, service in (("startupProbe", "liveness"), ("livenessProbe", "liveness"), ("readinessProbe", "readiness")):
        assert c[probe]["grpc"] == {"port": grpc_port, "service": service}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    _check_k8s_discovery_wiring(all_docs(), dep, yaml.safe_load(cfg["data"]["pylb.yaml"]))


# ---- the Dockerfile ---------------------------------------------------------------------------------

DEBIAN_RUNTIME_PACKAGE = {
    "libopenblas.so.0": {"libopenblas0-pthread", "libopenblas0-openmp", "libopenblas0-serial", "libopenblas0"},
    "libxxhash.so.0": {"libxxhash0"},
    "libcrypto.so.3": {"libssl3", "libssl3t64"},
    "libstdc++.so.6": {"libstdc++6"},
}
"""Debian runtime packages of the shared libraries pylb's extension may link (libc, libm,
libgcc_s and the loader come with every Debian image)."""

BASE_LIBS = {"libc.so.6", "libm.so.6", "libgcc_s.so.1", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1", "libpthread.so.0", "libdl.so.2"}


def _stages(text: str) -> list[tuple[str, str]]:
    """(FROM line, body) of each stage, line continuations joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        if line.startswith("FROM "):
            out.append((line, ""))
        elif out:
            out[-1] = (out[-1][0], out[-1][1] + line + "\n")
    return out


def test_dockerfile_is_multistage_slim_and_non_root() -> None:
    stages = _stages((REPO / "Dockerfile").read_text())
    assert len(stages) >= 2
    build_from, build_body = stages[0]
    run_from, run_body = stages[-1]
    assert "AS build" in build_from and "pip wheel" in build_body and "[k8s,epp,tokenizer]" in build_body  # discovery, pylb epp, engine-exact keys
    assert "-slim" in run_from
    installed = set(re.findall(r"apt-get install[^&]*", run_body)[0].split()[2:]) - {"-y", "--no-install-recommends"}
    assert not {p for p in installed if p.endswith("-dev") or p in ("g++", "gcc", "build-essential", "cmake")}, installed
    user = re.findall(r"^USER (\S+)", run_body, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert "COPY --from=build" in run_body and "ENTRYPOINT" in run_body
    # every shared library the built extension needs is installed in the runtime stage
    import pylb._core as core

    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) not installed: the runtime libraries were not checked against the extension")
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", subprocess.run([readelf, "-d", core.__file__], capture_output=True, text=True, check=True).stdout)
    assert "libopenblas.so.0" in needed
    for lib in needed:
        if lib in BASE_LIBS:
            continue
        assert lib in DEBIAN_RUNTIME_PACKAGE, f"the extension links {lib}: name its Debian runtime package here and in the Dockerfile"
        assert DEBIAN_RUNTIME_PACKAGE[lib] & installed, f"the runtime stage lacks {lib} ({DEBIAN_RUNTIME_PACKAGE[lib]})"


def test_dockerignore_keeps_the_build_context_small() -> None:
    """Everything is left out of the build context (`*`) but what the Dockerfile copies."""
    rules = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = set()
    for line in (REPO / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            copied |= {w.rstrip("/") for w in words[1:-1]}
    assert copied and copied <= allowed, f"copied but left out of the context: {copied - allowed}"
