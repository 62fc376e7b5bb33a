"""deploy/ is checked against the code: docker-compose parses it (Debian docker-compose), the Kubernetes
manifests parse and run existing CLI commands with valid options and settings, and the Grafana
dashboard, the alert rules and the HPA use only metric names the service exports."""
from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, require_tool
from typer.main import get_command

from dicom_fusion.service import telemetry
from dicom_fusion.service.cli import app
from dicom_fusion.service.config import ENV_PREFIX, Settings, load_settings
from dicom_fusion.service.ops import metrics
from dicom_fusion.service.storage.ledger import Ledger

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
OUR_IMAGES = {f"dicom-fusion:{VERSION}", f"dicom-fusion:{VERSION}-cuda"}
METRIC_RE = re.compile(r"\bdicom_fusion_[a-z0-9_]+")


# ---- helpers -----------------------------------------------------------------------------------
def check_cli(args: list[str]) -> None:
    """``args`` name a dicom-fusion command and parse with its options (nothing is run)."""
    group = get_command(app)
    assert args and args[0] in group.commands, f"{args[:1]} is not a dicom-fusion command"  # type: ignore[attr-defined]
    cmd = group.commands[args[0]]  # type: ignore[attr-defined]
    ctx = cmd.make_context(args[0], list(args[1:]))
    if args[0] == "worker" and ctx.params.get("queues"):
        assert set(ctx.params["queues"].split(",")) <= {"cpu", "gpu", "io"}, args


def check_settings_env(env: dict[str, str]) -> Settings:
    """Every DICOM_FUSION_* variable names a real setting and the values validate."""
    ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    fields = Settings.model_fields
    for key in ours:
        section, _, name = key[len(ENV_PREFIX):].lower().partition("__")
        assert section in fields, f"{key}: no setting {section!r}"
        if name:
            model = fields[section].annotation
            assert name in model.model_fields, f"{key}: no setting {section}.{name}"  # type: ignore[union-attr]
    saved = dict(os.environ)
    try:
        os.environ.update(ours)
        return load_settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def exported_metric_names(tmp_path: Path) -> set[str]:
    """Sample names the API (ledger collector) and the listener/worker processes can export."""
    settings = load_settings(data_dir=tmp_path / "var")
    families = list(metrics.LedgerCollector(Ledger(settings.ledger_url), settings).collect())
    for m in telemetry.PROCESS_METRICS:
        families.extend(m.collect())
    names = {telemetry.GPU_MEMORY}
    for fam in families:
        if fam.type == "counter":
            names.add(f"{fam.name}_total")
        elif fam.type == "histogram":
            names |= {f"{fam.name}_bucket", f"{fam.name}_sum", f"{fam.name}_count"}
        else:
            names.add(fam.name)
        names |= {s.name for s in fam.samples}
    return names


def k8s_docs() -> Iterator[dict[str, Any]]:
    for f in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                yield doc


# ---- docker-compose ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    exe = require_tool("docker-compose")
    env = dict(os.environ, FLOWER_BASIC_AUTH="ops:pw", GRAFANA_ADMIN_PASSWORD="pw")
    res = subprocess.run([exe, "-f", str(DEPLOY / "docker-compose.yml"), "config"], capture_output=True,
                         text=True, env=env, timeout=120, cwd=DEPLOY)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)  # type: ignore[no-any-return]


def test_compose_parses_and_runs_our_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "postgres", "orthanc", "fhir", "listener", "worker-cpu", "worker-io", "worker-gpu", "api",
            "flower", "prometheus", "grafana"} <= set(services)
    ours = {name: s for name, s in services.items() if s.get("image") in OUR_IMAGES}
    assert set(ours) == {"migrate", "listener", "worker-cpu", "worker-io", "worker-gpu", "api"}
    assert services["migrate"]["command"] == ["db", "upgrade"]
    for name, s in ours.items():
        check_cli(s["command"])
        if name != "migrate":  # every process starts on a migrated ledger (they refuse an older schema)
            assert s["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
        settings = check_settings_env({k: str(v) for k, v in s["environment"].items()})
        assert settings.metrics.listener_port == 9101 and settings.metrics.worker_port == 9102, name
    gpu = services["worker-gpu"]
    assert gpu["image"].endswith("-cuda") and gpu["environment"]["DICOM_FUSION_MODEL__DEVICE"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["api"]["environment"]["DICOM_FUSION_API__TOKEN_FILE"] == "/run/secrets/api_token"
    assert services["flower"]["environment"]["CELERY_BROKER_URL"] == ours["api"]["environment"]["DICOM_FUSION_BROKER__URL"]
    binds = [m.split(":")[0] if isinstance(m, str) else m.get("source", "")
             for m in services["prometheus"]["volumes"] + services["grafana"]["volumes"]]
    binds = [b for b in binds if b.startswith("/")]
    assert len(binds) == 4
    for source in binds:  # config files and provisioning folders the containers mount
        assert Path(source).exists(), source


def test_compose_refuses_default_secrets() -> None:
    exe = require_tool("docker-compose")
    env = {k: v for k, v in os.environ.items() if k not in ("FLOWER_BASIC_AUTH", "GRAFANA_ADMIN_PASSWORD")}
    res = subprocess.run([exe, "-f", str(DEPLOY / "docker-compose.yml"), "config"], capture_output=True,
                         text=True, env=env, timeout=120, cwd=DEPLOY)
    assert res.returncode != 0 and "FLOWER_BASIC_AUTH" in res.stderr


def test_prometheus_scrapes_the_compose_services(compose: dict[str, Any]) -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["dicom-fusion-api"]["authorization"]["credentials_file"] == "/run/secrets/api_token"
    for job in jobs.values():
        for target in job["static_configs"][0]["targets"]:
            host, port = target.split(":")
            service = compose["services"][host]
            expected = {"api": 8080, "listener": 9101}.get(host, 9102)
            assert int(port) == expected, target
            assert service.get("image") in OUR_IMAGES


# ---- metric names ------------------------------------------------------------------------------
def test_grafana_alerts_and_hpa_use_exported_metrics(tmp_path: Path) -> None:
    exported = exported_metric_names(tmp_path)
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "dicom-fusion.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 15
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    exprs += [d["spec"]["metrics"][0]["external"]["metric"]["name"] for d in k8s_docs()
              if d["kind"] == "HorizontalPodAutoscaler"]
    used = {name for e in exprs for name in METRIC_RE.findall(e)}
    assert used - exported == set()
    # and the dashboard shows every family the service exports
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in exported}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert families - shown == set()
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {ds["datasources"][0]["uid"]}


# ---- Kubernetes --------------------------------------------------------------------------------
def test_k8s_manifests_are_consistent() -> None:
    docs = list(k8s_docs())
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for d in docs:
        assert d["apiVersion"] and d["metadata"]["name"]
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    deployments = by_kind["Deployment"]
    assert set(deployments) == {"listener", "api", "worker-cpu", "worker-io", "worker-gpu"}
    config = by_kind["ConfigMap"]["dicom-fusion-config"]["data"]
    secret = by_kind["Secret"]["dicom-fusion-secrets"]["stringData"]
    claims = set(by_kind["PersistentVolumeClaim"])
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        [c] = pod["spec"]["containers"]
        assert c["image"] in OUR_IMAGES
        check_cli(c["args"])
        [wait] = pod["spec"]["initContainers"]  # waits for the ledger-migrate Job: never an older schema
        assert wait["args"] == ["db", "current"] and wait["image"] in OUR_IMAGES, name
        check_cli(wait["args"])
        env = dict(config)
        for e in c.get("env", []):
            if "valueFrom" in e:
                ref = e["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "dicom-fusion-secrets" and ref["key"] in secret, e
                env[e["name"]] = secret[ref["key"]]
            else:
                env[e["name"]] = e["value"]
        check_settings_env(env)
        assert {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]} <= claims
        if name.startswith("worker-"):
            assert c["args"][c["args"].index("--queues") + 1] == name.removeprefix("worker-")
    [job] = by_kind["Job"].values()
    [migrate] = job["spec"]["template"]["spec"]["containers"]
    assert migrate["args"] == ["db", "upgrade"] and migrate["image"] in OUR_IMAGES
    check_cli(migrate["args"])
    gpu = deployments["worker-gpu"]["spec"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["nodeSelector"] and gpu["containers"][0]["image"].endswith("-cuda")
    assert "nvidia.com/gpu" not in str(deployments["worker-cpu"]["spec"]["template"])
    listener_svc = by_kind["Service"]["listener"]["spec"]
    assert listener_svc["ports"][0]["port"] == 11112
    assert listener_svc["selector"].items() <= \
        deployments["listener"]["spec"]["template"]["metadata"]["labels"].items()
    hpas = by_kind["HorizontalPodAutoscaler"]
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()} == {"worker-cpu", "worker-io", "worker-gpu"}
    for h in hpas.values():
        queue = h["spec"]["metrics"][0]["external"]["metric"]["selector"]["matchLabels"]["queue"]
        assert h["spec"]["scaleTargetRef"]["name"] == f"worker-{queue}"
    api = deployments["api"]["spec"]["template"]["spec"]["containers"][0]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert any(e["name"] == "DICOM_FUSION_API__TOKEN" for e in api["env"])
