"""deploy/kubernetes/ and deploy/grafana/: every manifest parsed, and what matters in them checked.

What matters: the image and its version, probes on the right paths and port,
non-root and the security context, one replica recreated (no leader election
yet), names that must agree across files (ConfigMap, Secret, Service port,
ServiceMonitor), the ConfigMap's settings as setpoint itself loads them, and
a dashboard that only uses metrics setpoint exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from servers import PROMTOOL, require

from reconciler.metrics import Metrics
from reconciler.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "deploy" / "kubernetes"
DASHBOARD = REPO / "deploy" / "grafana" / "setpoint.json"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
PROMETHEUS_RULE = "prometheusrule.yaml"  # the rules of deploy/prometheus/alerts.yaml, wrapped


def _exposed() -> tuple[set[str], set[str]]:
    """The metric names the daemon exposes (counters with `_total`), and which of them are histograms."""
    names, histograms = set(), set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        else:
            names.add(family.name)
        if family.type == "histogram":
            histograms.add(family.name)
    return names, histograms


CONTRACT, HISTOGRAMS = _exposed()


def load(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d is not None]


def manifests() -> dict[str, list[dict[str, Any]]]:
    return {path.name: load(path.name) for path in sorted(KUBE.glob("*.yaml"))}


def one(kind: str) -> dict[str, Any]:
    found = [d for docs in manifests().values() for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"{len(found)} {kind} manifests"
    return found[0]


def kustomization() -> dict[str, Any]:
    return load("kustomization.yaml")[0]


DEPLOYMENT = one("Deployment")
POD = DEPLOYMENT["spec"]["template"]["spec"]
(CONTAINER,) = POD["containers"]
CONFIG_MAP = one("ConfigMap")
CONFIG = yaml.safe_load(CONFIG_MAP["data"]["config.yaml"])
SECRET = one("Secret")
SERVICE = one("Service")


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (CPU or memory) as a number, for comparisons."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


def volume(name: str) -> dict[str, Any]:
    return next(v for v in POD["volumes"] if v["name"] == name)


def mount(path: str) -> dict[str, Any]:
    return next(m for m in CONTAINER["volumeMounts"] if m["mountPath"] == path)


# --- every manifest ------------------------------------------------------------------------------


def test_every_manifest_parses_and_is_namespace_agnostic() -> None:
    for name, docs in manifests().items():
        assert docs, f"{name} is empty"
        for doc in docs:
            assert {"apiVersion", "kind"} <= set(doc), name
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], name
                assert "namespace" not in doc["metadata"], f"{name}: set the namespace when applying, not here"
                assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "setpoint", name
    assert "namespace" not in kustomization()


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    resources = kustomization()["resources"]
    present = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert sorted(resources) == sorted(present | {PROMETHEUS_RULE})
    assert "secret.example.yaml" not in resources, "a placeholder token must never be applied"


# --- the Deployment ------------------------------------------------------------------------------


def test_two_replicas_rolled_so_that_a_standby_is_always_there() -> None:
    spec = DEPLOYMENT["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    spread = spec["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in spread:
        assert constraint["labelSelector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()


def test_the_image_is_this_version_of_setpoint() -> None:
    assert CONTAINER["image"] == f"setpoint:{VERSION}"
    assert CONTAINER["imagePullPolicy"] == "IfNotPresent"
    (image,) = kustomization()["images"]
    assert image["name"] == "setpoint" and image["newTag"] == VERSION
    assert CONTAINER["args"] == ["run", "-c", "/etc/setpoint/config.yaml"]


def test_probes_hit_readyz_and_healthz_on_the_port_the_daemon_listens_on() -> None:
    (port,) = CONTAINER["ports"]
    assert port == {"name": "metrics", "containerPort": 9464, "protocol": "TCP"}
    assert CONTAINER["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert CONTAINER["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert CONFIG["http"]["listen"] == f"0.0.0.0:{port['containerPort']}", "the kubelet probes from outside the pod"


def test_non_root_and_locked_down() -> None:
    containerfile = (REPO / "deploy" / "container" / "Containerfile").read_text()
    user = re.findall(r"^USER (\d+):(\d+)$", containerfile, re.MULTILINE)[-1]
    pod = POD["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert (str(pod["runAsUser"]), str(pod["runAsGroup"])) == user, "the image's USER"
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    context = CONTAINER["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in context
    assert POD["automountServiceAccountToken"] is False


def test_requests_and_limits_for_cpu_and_memory() -> None:
    resources = CONTAINER["resources"]
    for what in ("cpu", "memory"):
        assert quantity(resources["requests"][what]) <= quantity(resources["limits"][what]), what


def test_the_grace_period_is_longer_than_the_drain() -> None:
    drain = CONFIG["reconciler"]["shutdown_timeout_seconds"] + 5  # running plans, then queued webhooks
    assert POD["terminationGracePeriodSeconds"] > drain


def test_settings_come_from_the_config_map_and_tokens_from_the_secret() -> None:
    assert volume("config")["configMap"]["name"] == CONFIG_MAP["metadata"]["name"]
    assert mount("/etc/setpoint") == {"name": "config", "mountPath": "/etc/setpoint", "readOnly": True}
    assert "config.yaml" in CONFIG_MAP["data"]

    tokens = volume("tokens")["secret"]
    assert tokens["secretName"] == SECRET["metadata"]["name"]
    assert tokens["defaultMode"] == 0o440 and POD["securityContext"]["fsGroup"] == POD["securityContext"]["runAsGroup"]
    mounted = mount("/run/secrets/setpoint")
    assert mounted["name"] == "tokens" and mounted["readOnly"] is True
    files = {group: CONFIG[group]["token_file"] for group in ("approvals", "alerts")}
    files["etcd.password_file"] = CONFIG["etcd"]["password_file"]
    for group, file in files.items():
        path = Path(file)
        assert path.parent == Path(mounted["mountPath"]), group
        assert path.name in SECRET["stringData"], f"{group}: the Secret has no key {path.name}"


def test_etcd_is_reached_over_tls_with_the_certificates_from_their_own_secret() -> None:
    tls = CONFIG["etcd"]["tls"]
    assert "insecure" not in CONFIG["etcd"], "plain text to etcd is for a trusted network, not the shipped default"
    certificates = volume("etcd-tls")["secret"]
    assert certificates == {"secretName": "setpoint-etcd-tls", "defaultMode": 0o440}
    mounted = mount("/run/secrets/setpoint-etcd")
    assert mounted["name"] == "etcd-tls" and mounted["readOnly"] is True
    # The keys a cert-manager Certificate writes into its Secret.
    assert {name: Path(path) for name, path in tls.items()} == {
        "ca_file": Path(mounted["mountPath"]) / "ca.crt",
        "cert_file": Path(mounted["mountPath"]) / "tls.crt",
        "key_file": Path(mounted["mountPath"]) / "tls.key",
    }
    assert CONFIG["etcd"]["username"] == "setpoint-daemon"  # the role README's Securing etcd creates


def test_the_secret_example_holds_no_secret() -> None:
    assert SECRET["type"] == "Opaque" and "data" not in SECRET
    assert set(SECRET["stringData"].values()) == {""}, "empty on purpose: setpoint refuses to start on it"


def test_the_config_map_settings_load_with_setpoints_own_model(tmp_path: Path) -> None:
    raw = dict(CONFIG)
    if "alerts" not in Settings.model_fields:
        # The alert webhook's settings (alerts.token_env / token_file, issue 8) are built in another branch;
        # until they are merged, the group is checked for its shape here and the rest by the model.
        assert set(raw.pop("alerts")) <= {"token_env", "token_file"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    settings = load_settings(path)
    assert settings.etcd.endpoints == ["etcd:2379"], "an etcd Service, not the embedded development etcd"
    assert settings.http.listen == "0.0.0.0:9464"
    assert settings.approvals.token_file == "/run/secrets/setpoint/approval-token"


# --- Service, ServiceMonitor, PodDisruptionBudget --------------------------------------------------


def test_the_service_and_the_service_monitor_agree_on_the_metrics_port() -> None:
    labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    assert DEPLOYMENT["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert SERVICE["spec"]["selector"].items() <= labels.items()
    (port,) = SERVICE["spec"]["ports"]
    assert port == {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"}

    monitor = one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= SERVICE["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"


def test_the_disruption_budget_keeps_one_pod_and_lets_a_drain_evict_the_other() -> None:
    budget = one("PodDisruptionBudget")
    assert budget["apiVersion"] == "policy/v1"
    assert budget["spec"]["selector"]["matchLabels"].items() <= DEPLOYMENT["spec"]["template"]["metadata"][
        "labels"
    ].items()
    assert budget["spec"] == {"minAvailable": 1, "selector": budget["spec"]["selector"]}
    assert budget["spec"]["minAvailable"] < DEPLOYMENT["spec"]["replicas"], "a budget of every pod blocks drains"


def test_kustomize_builds_it_with_the_image_set(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found: the manifests are still checked one by one")
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBE, copy)
    if not (copy / PROMETHEUS_RULE).exists():  # until the other branch's file is merged
        (copy / PROMETHEUS_RULE).write_text(
            "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata: {name: setpoint}\nspec: {}\n"
        )
    done = subprocess.run([kubectl, "kustomize", str(copy)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    built = list(yaml.safe_load_all(done.stdout))
    assert sorted(d["kind"] for d in built) == sorted(
        ["ConfigMap", "Deployment", "Service", "ServiceMonitor", "PrometheusRule", "PodDisruptionBudget"]
    )
    deployment = next(d for d in built if d["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == f"setpoint:{VERSION}"


# --- the Grafana dashboard -----------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def expressions() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bsetpoint_[a-z0-9_]+\b", expr))


def test_the_dashboard_is_importable_with_a_prometheus_data_source_input() -> None:
    board = dashboard()
    (source,) = board["__inputs"]
    assert source["name"] == "DS_PROMETHEUS" and source["type"] == "datasource" and source["pluginId"] == "prometheus"
    assert board["uid"] == "setpoint" and board["id"] is None
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"], panel["title"]
    for variable in board["templating"]["list"]:
        assert variable["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def test_the_dashboard_uses_only_metrics_of_the_contract() -> None:
    for expr in expressions():
        for name in metric_names(expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if base != name:
                assert base in HISTOGRAMS, f"{name}: {base} is not a histogram of the contract ({expr})"
            else:
                assert name in CONTRACT, f"{name} is not in the metric contract ({expr})"
                assert name not in HISTOGRAMS, f"{name}: query a histogram through _bucket, _sum or _count"


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for e in expressions() for n in metric_names(e)}
    wanted = {
        "setpoint_resources", "setpoint_reconcile_total", "setpoint_workqueue_depth",
        "setpoint_workqueue_queue_duration_seconds", "setpoint_approvals_pending",
        "setpoint_approvals_oldest_age_seconds", "setpoint_heals_total", "setpoint_issues_open",
    }  # fmt: skip
    assert wanted <= used, wanted - used
    assert any("setpoint_reconcile_total" in e and "error" in e for e in expressions()), "reconcile errors"
    assert any(re.search(r"by \(phase\)\s*\(setpoint_resources", e) for e in expressions()), "resources by phase"


def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    promtool = require(PROMTOOL)
    concrete = [
        e.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$instance", ".*") for e in expressions()
    ]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expression_{i}", "expr": e} for i, e in enumerate(concrete)
    ]}]}  # fmt: skip
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
