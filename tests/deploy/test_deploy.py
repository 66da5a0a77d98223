"""Static validation of deploy/: what can be checked without a Docker engine or a cluster."""

from __future__ import annotations

import configparser
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from eir_server.obs.metrics import exposed_sample_names

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to read the deploy YAML files")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# `eir-server serve` options (the lead's CLI contract); cross-checked against the real parser
# by test_serve_flags_match_the_cli when eir_server.cli exists.
SERVE_FLAGS = {
    "--diameter-listen", "--origin-host", "--origin-realm", "--workers", "--unknown-equipment",
    "--config", "--store", "--register", "--metrics-listen", "--log-format", "--log-level",
    "--audit", "--audit-sample", "--max-register-age",
}  # fmt: skip
CONFIG_KEYS = {f[2:].replace("-", "_") for f in SERVE_FLAGS} - {"config"}
ENV_VARS = {"EIR_" + k.upper() for k in CONFIG_KEYS}
DIAMETER_PORT, METRICS_PORT = 3868, 9868
# Series from Prometheus itself that rules may use besides ours.
FOREIGN_SERIES = {"up"}


def load_yaml(rel: str) -> Any:
    return yaml.safe_load((DEPLOY / rel).read_text())


def eir_names(expr: str) -> set[str]:
    return set(re.findall(r"\beir_[a-z0-9_]+", expr))


def flags_in(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


def check_config_toml(text: str) -> dict[str, Any]:
    cfg = tomllib.loads(text)
    assert set(cfg) <= CONFIG_KEYS, set(cfg) - CONFIG_KEYS
    assert cfg["diameter_listen"].endswith(f":{DIAMETER_PORT}")
    assert cfg["metrics_listen"].endswith(f":{METRICS_PORT}")
    assert cfg["unknown_equipment"] in {"whitelisted", "greylisted", "blacklisted", "unknown"}
    assert cfg["log_format"] in {"auto", "json", "console"}
    assert cfg["audit"] in {"on", "off"} and 0 <= cfg["audit_sample"] <= 1
    return cfg


def all_yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


@pytest.mark.parametrize("path", all_yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(d is not None for d in docs)


# --- Prometheus -----------------------------------------------------------------------------


def test_alert_rules_use_only_defined_metrics_and_cover_the_issue() -> None:
    rules = [r for g in load_yaml("prometheus/alerts.yml")["groups"] for r in g["rules"]]
    known = exposed_sample_names()
    for rule in rules:
        assert eir_names(rule["expr"]) <= known, (rule["alert"], eir_names(rule["expr"]) - known)
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"]
        other = set(re.findall(r"\b([a-z_]+)\{", rule["expr"])) - known
        assert other <= FOREIGN_SERIES, other
    names = {r["alert"] for r in rules}
    for required in ("EirNoDiameterPeersUp", "EirHighErrorRatio", "EirHighLatencyP99",
                     "EirRegisterStale", "EirRedisFallbackActive"):
        assert required in names


@pytest.mark.parametrize(
    "args",
    [
        ["check", "rules", "alerts.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "alerts_test.yml"],  # each alert fires (and only) when it should
    ],
    ids=" ".join,
)
def test_promtool(args: list[str]) -> None:
    # `make test` installs promtool (scripts/system-deps.sh): a missing one is a failure.
    assert shutil.which("promtool"), "promtool missing: run scripts/system-deps.sh"
    res = subprocess.run(["promtool", *args], cwd=DEPLOY / "prometheus", capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_prometheus_scrapes_the_eir_metrics_port_and_loads_the_rules() -> None:
    cfg = load_yaml("prometheus/prometheus.yml")
    assert "alerts.yml" in cfg["rule_files"]
    [job] = [j for j in cfg["scrape_configs"] if j["job_name"] == "eir"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"eir:{METRICS_PORT}"]


# --- Grafana --------------------------------------------------------------------------------


def test_dashboard_queries_use_only_defined_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana/eir-dashboard.json").read_text())
    known = exposed_sample_names()
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"]]
    used: set[str] = set()
    for expr in exprs:
        assert eir_names(expr) <= known, (expr, eir_names(expr) - known)
        used |= eir_names(expr)
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("requests/s by result", "verdicts", "p50 / p99", "peers up", "redis fallback",
                  "register age"):
        assert topic in titles
    # every series family the NOC needs is on the dashboard
    for name in ("eir_requests_total", "eir_verdicts_total", "eir_request_duration_seconds_bucket",
                 "eir_diameter_peers", "eir_store_fallback_active",
                 "eir_register_last_sync_timestamp_seconds"):
        assert name in used
    ds_uid = load_yaml("grafana/provisioning/datasources/prometheus.yml")["datasources"][0]["uid"]
    assert {p["datasource"]["uid"] for p in dash["panels"]} == {ds_uid}
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


# --- docker ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_slim_non_root_and_exposes_the_ports() -> None:
    ins = dockerfile_instructions()
    froms = [r for k, r in ins if k == "FROM"]
    assert froms and all(re.match(r"python:3\.1[1-9]-slim\b", f) for f in froms)
    users = [r for k, r in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    exposed = {int(p.split("/")[0]) for k, r in ins if k == "EXPOSE" for p in r.split()}
    assert exposed == {DIAMETER_PORT, METRICS_PORT}
    assert any(k == "RUN" and "pip install ." in r for k, r in ins)
    [health] = [r for k, r in ins if k == "HEALTHCHECK"]
    assert "/healthz" in health and "9868" in health
    assert json.loads([r for k, r in ins if k == "ENTRYPOINT"][-1]) == ["eir-server"]
    for k, r in ins:
        if k == "COPY" and "--from" not in r:
            for src in r.split()[:-1]:
                # the build context is the repo root; README.md is required by pyproject
                assert src in {"pyproject.toml", "README.md"} or (ROOT / src).is_dir(), src
        if k == "ENV":
            for var in re.findall(r"\b(EIR_[A-Z_]+)=", r):
                assert var in ENV_VARS, var


def test_compose_wires_eir_redis_prometheus_grafana() -> None:
    compose = load_yaml("docker-compose.yml")
    services = compose["services"]
    assert set(services) >= {"eir", "redis", "prometheus", "grafana"}
    eir = services["eir"]
    assert (DEPLOY / eir["build"]["context"] / eir["build"]["dockerfile"]).resolve() == (
        DEPLOY / "Dockerfile"
    )
    assert eir["command"][0] == "serve"
    assert flags_in(eir["command"]) <= SERVE_FLAGS
    assert set(eir["environment"]) <= ENV_VARS
    assert eir["environment"]["EIR_STORE"].startswith("redis://redis:6379")
    ports = {p.split(":")[1].split("/")[0] for p in eir["ports"]}
    assert ports == {str(DIAMETER_PORT), str(METRICS_PORT)}
    # every bind-mounted file exists; config mounted where --config points
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), src
    cfg_path = eir["command"][eir["command"].index("--config") + 1]
    [cfg_mount] = [v for v in eir["volumes"] if v.split(":")[1] == cfg_path]
    check_config_toml((DEPLOY / cfg_mount.split(":")[0]).read_text())
    prom_mounts = {v.split(":")[1] for v in services["prometheus"]["volumes"]}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"} <= prom_mounts


# --- systemd --------------------------------------------------------------------------------


def unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((DEPLOY / "eir-server.service").read_text())
    return cp


def test_systemd_unit_runs_serve_with_real_flags_and_hardening() -> None:
    svc = unit()["Service"]
    argv = shlex.split(svc["ExecStart"])
    assert argv[0].endswith("/eir-server") and argv[1] == "serve"
    assert flags_in(argv) <= SERVE_FLAGS
    assert argv[argv.index("--metrics-listen") + 1].endswith(f":{METRICS_PORT}")
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": "",
                       "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX"}.items():
        assert svc[key] == value, key
    assert svc.get("DynamicUser") == "yes" or svc.get("User") not in (None, "root")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # ExecStart must exist for verify: point it at a real binary, keep everything else.
    text = (DEPLOY / "eir-server.service").read_text()
    text = text.replace("/opt/eir-server/bin/eir-server", shutil.which("true") or "/bin/true")
    (tmp_path / "eir-server.service").write_text(text)
    res = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "eir-server.service")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout + res.stderr == "", res.stdout + res.stderr


# --- Kubernetes -----------------------------------------------------------------------------


def k8s() -> dict[str, dict[str, Any]]:
    out = {}
    for name in load_yaml("k8s/kustomization.yaml")["resources"]:
        doc = load_yaml(f"k8s/{name}")
        out[doc["kind"]] = doc
    return out


def test_k8s_deployment_probes_ports_and_args() -> None:
    res = k8s()
    assert set(res) == {"ConfigMap", "Deployment", "Service"}
    dep = res["Deployment"]
    assert dep["apiVersion"] == "apps/v1"
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    [c] = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"diameter": DIAMETER_PORT, "metrics": METRICS_PORT}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["args"][0] == "serve" and flags_in(c["args"]) <= SERVE_FLAGS
    assert {e["name"] for e in c["env"]} <= ENV_VARS
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # the config file --config names is the ConfigMap's key, mounted there
    cfg_path = Path(c["args"][c["args"].index("--config") + 1])
    [mount] = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == cfg_path.parent]
    [vol] = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    cm = res["ConfigMap"]
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    cfg = check_config_toml(cm["data"][cfg_path.name])
    assert cfg == tomllib.loads((DEPLOY / "eir-server.toml").read_text())
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)


def test_k8s_service_exposes_diameter_and_metrics() -> None:
    res = k8s()
    svc, dep = res["Service"], res["Deployment"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    got = {(p["port"], p["protocol"]) for p in svc["spec"]["ports"]}
    assert got == {(DIAMETER_PORT, "TCP"), (METRICS_PORT, "TCP")}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports


# --- the real CLI, once it exists -----------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("eir_server.cli") is None,
                    reason="eir_server.cli not written yet")
def test_serve_flags_match_the_cli() -> None:
    code = ("import sys; from eir_server.cli import main; "
            "sys.argv = ['eir-server', 'serve', '--help']; main()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    flags = set(re.findall(r"(--[a-z][a-z0-9-]+)", res.stdout))
    assert SERVE_FLAGS - {"--config"} <= flags | {"--help"}, SERVE_FLAGS - flags
