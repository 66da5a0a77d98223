"""deploy/ as an operator gets it. Docker and a cluster are not available here, so each
deployment is checked in two ways:

1. its files against their schemas (the Compose specification, Kubernetes' OpenAPI schemas,
   both bundled offline in the test dependencies; promtool; systemd-analyze);
2. its effective configuration run for real: the TOML plus the environment the Dockerfile,
   compose service, manifest or unit sets, with container paths, host names and ports mapped to
   this machine, against a real password-protected redis-server. The shipped sync command loads
   a register, then `eir-server serve` answers ECRs and `/readyz` says 200.
"""

from __future__ import annotations

import configparser
import contextlib
import functools
import http.server
import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from eir_server import __version__
from eir_server.config import OPTIONS
from eir_server.obs.metrics import exposed_sample_names
from tests.conftest import REDIS_SERVER, Dirbs
from tests.eirproc import EIR, S13Client, http_get, stop, wait_until
from tests.netutil import free_port, wait_for_port

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to read the deploy YAML files")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONFIG_KEYS = {f.name for f in OPTIONS}
ENV_VARS = {"EIR_" + k.upper() for k in CONFIG_KEYS}
# besides the serve options: sync's source (used by the units and manifests, not by serve)
DEPLOY_ENV_VARS = ENV_VARS | {"EIR_SYNC_SOURCE"}
DIAMETER_PORT, METRICS_PORT = 3868, 9868
FOREIGN_SERIES = {"up", "absent", "time"}  # Prometheus' own series/functions rules may use

STOLEN = "35209900176148"
CLEAN = "49015420323751"
BLACKLISTED, WHITELISTED = 1, 0


def load_yaml(rel: str) -> Any:
    return yaml.safe_load((DEPLOY / rel).read_text())


def load_all_yaml(rel: str) -> list[Any]:
    return [d for d in yaml.safe_load_all((DEPLOY / rel).read_text()) if d is not None]


def eir_names(expr: str) -> set[str]:
    return set(re.findall(r"\beir_[a-z0-9_]+", expr))


def all_yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


@pytest.mark.parametrize("path", all_yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(d is not None for d in docs)


# --- schemas -----------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    import jsonschema

    schema_file = importlib.resources.files("check_jsonschema") / (
        "builtin_schemas/vendor/compose-spec.json")
    schema = json.loads(schema_file.read_text())
    jsonschema.validate(load_yaml("docker-compose.yml"), schema)
    # the check has teeth: a misspelled key is refused
    broken = load_yaml("docker-compose.yml")
    broken["services"]["eir"]["enviroment"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def k8s_resources() -> list[dict[str, Any]]:
    out = []
    for name in load_yaml("k8s/kustomization.yaml")["resources"]:
        out.extend(load_all_yaml(f"k8s/{name}"))
    return out


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [r for r in k8s_resources() if r["kind"] == kind]


def test_k8s_manifests_match_the_kubernetes_schemas() -> None:
    import kubernetes_validate

    for doc in k8s_resources():
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    broken = k8s_kind("StatefulSet")[0]
    broken["spec"]["template"]["spec"]["containers"][0]["startupProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30.0", strict=True)


def systemd_units() -> list[Path]:
    return sorted((DEPLOY / "systemd").glob("*.service")) + sorted(
        (DEPLOY / "systemd").glob("*.timer"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # ExecStart must exist for verify: point it at a real binary, keep everything else.
    for unit in systemd_units():
        text = unit.read_text().replace("/opt/eir-server/bin/eir-server",
                                        shutil.which("true") or "/bin/true")
        (tmp_path / unit.name).write_text(text)
    res = subprocess.run(["systemd-analyze", "verify",
                          *(str(tmp_path / u.name) for u in systemd_units())],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout + res.stderr == "", res.stdout + res.stderr


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


# --- what the issue asked of each deployment ---------------------------------------------------


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose variable interpolation: ${VAR}, ${VAR:-default}, ${VAR:?error}; $$ is a $."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        got = env.get(name, "")
        if op == ":?" and not got:
            raise ValueError(f"{name}: {arg}")
        if op == ":-" and not got:
            return arg
        return got

    out = re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:[-?])([^}]*))?\}", one, value)
    return out.replace("$$", "$")


def interpolated(obj: Any, env: dict[str, str]) -> Any:
    if isinstance(obj, str):
        return interpolate(obj, env)
    if isinstance(obj, list):
        return [interpolated(v, env) for v in obj]
    if isinstance(obj, dict):
        return {k: interpolated(v, env) for k, v in obj.items()}
    return obj


def test_no_deployment_loads_a_register_into_a_redis_node() -> None:
    """The day-one defect: `store` (Redis) and `register` together make serve refuse to start."""
    toml = tomllib.loads((DEPLOY / "eir-server.toml").read_text())
    assert "register" not in toml
    [cm] = k8s_kind("ConfigMap")
    assert tomllib.loads(cm["data"]["eir-server.toml"]) == toml
    texts = [(DEPLOY / "Dockerfile").read_text(), (DEPLOY / "docker-compose.yml").read_text(),
             *(p.read_text() for p in (DEPLOY / "k8s").glob("*.yaml")),
             *(p.read_text() for p in systemd_units())]
    for text in texts:
        text = "\n".join(x for x in text.splitlines() if not x.strip().startswith("#"))
        assert "EIR_REGISTER" not in text and "--register" not in text


def test_compose_wires_redis_sync_eir_prometheus_alertmanager_grafana() -> None:
    compose = load_yaml("docker-compose.yml")
    services = compose["services"]
    assert set(services) >= {"eir", "sync", "redis", "prometheus", "alertmanager", "grafana"}
    # without the .env the file refuses to start: no default passwords
    for name in ("redis", "eir", "sync", "grafana"):
        with pytest.raises(ValueError, match="PASSWORD"):
            interpolated(services[name], {})
    env = {"REDIS_PASSWORD": "pw1", "GRAFANA_ADMIN_PASSWORD": "pw2"}
    s = interpolated(services, env)
    assert s["redis"]["command"][s["redis"]["command"].index("--requirepass") + 1] == "pw1"
    assert s["eir"]["environment"]["EIR_STORE"] == "redis://:pw1@redis:6379/0"
    assert s["sync"]["environment"]["EIR_STORE"] == s["eir"]["environment"]["EIR_STORE"]
    assert s["sync"]["command"][0] == "sync" and "--interval" in s["sync"]["command"]
    assert s["eir"]["command"][0] == "serve"
    for svc in ("eir", "sync"):
        b = s[svc]["build"]
        assert (DEPLOY / b["context"] / b["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        assert s[svc]["image"] == f"eir-server:{__version__}"
        assert set(s[svc]["environment"]) <= DEPLOY_ENV_VARS
    grafana = s["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == "pw2"
    assert "admin/admin" not in (DEPLOY / "docker-compose.yml").read_text()
    # Prometheus loads the rules and sends alerts to the Alertmanager
    prom = load_yaml("prometheus/prometheus.yml")
    assert "alerts.yml" in prom["rule_files"]
    [am] = prom["alerting"]["alertmanagers"]
    assert am["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert "9093:9093" in s["alertmanager"]["ports"]
    amcfg = load_yaml("prometheus/alertmanager.yml")
    receivers = {r["name"] for r in amcfg["receivers"]}
    assert amcfg["route"]["receiver"] in receivers
    assert {r["receiver"] for r in amcfg["route"].get("routes", [])} <= receivers
    [job] = [j for j in prom["scrape_configs"] if j["job_name"] == "eir"]
    assert [t for sc in job["static_configs"] for t in sc["targets"]] == [f"eir:{METRICS_PORT}"]
    # every bind-mounted file exists
    for svc in compose["services"].values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), src
    example = (DEPLOY / ".env.example").read_text()
    assert "REDIS_PASSWORD=" in example and "GRAFANA_ADMIN_PASSWORD=" in example


def test_grafana_dashboard_uses_a_datasource_variable() -> None:
    dash = json.loads((DEPLOY / "grafana/eir-dashboard.json").read_text())
    known = exposed_sample_names()
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    used: set[str] = set()
    for expr in exprs:
        assert eir_names(expr) <= known, (expr, eir_names(expr) - known)
        used |= eir_names(expr)
    for name in ("eir_requests_total", "eir_verdicts_total", "eir_request_duration_seconds_bucket",
                 "eir_diameter_peers", "eir_store_fallback_active"):
        assert name in used
    [var] = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus"
    uids = {p["datasource"]["uid"] for p in dash["panels"]}
    uids |= {v["datasource"]["uid"] for v in dash["templating"]["list"] if "datasource" in v}
    assert uids == {"${" + var["name"] + "}"}  # whatever uid the Prometheus datasource has
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_alert_rules_use_only_defined_metrics_and_cover_the_issue() -> None:
    rules = [r for g in load_yaml("prometheus/alerts.yml")["groups"] for r in g["rules"]]
    known = exposed_sample_names()
    for rule in rules:
        assert eir_names(rule["expr"]) <= known, (rule["alert"], eir_names(rule["expr"]) - known)
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"]
        other = set(re.findall(r"\b([a-z_]+)[{(]", rule["expr"])) - known
        assert other <= FOREIGN_SERIES | {"sum", "max", "min", "rate", "increase",
                                          "histogram_quantile", "by", "ignoring", "count",
                                          "on"}, other
        assert "--unknown-equipment" not in json.dumps(rule["annotations"])
    names = {r["alert"] for r in rules}
    for required in ("EirNoDiameterPeersUp", "EirHighErrorRatio", "EirHighLatencyP99",
                     "EirRegisterStale", "EirStoreFallbackActive"):
        assert required in names


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for k, r in dockerfile_instructions():
        if k == "ENV":
            for item in shlex.split(r):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def test_dockerfile_is_slim_non_root_and_exposes_the_ports() -> None:
    ins = dockerfile_instructions()
    froms = [r for k, r in ins if k == "FROM"]
    assert froms and all(re.match(r"python:3\.1[1-9]-slim\b", f) for f in froms)
    users = [r for k, r in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    exposed = {int(p.split("/")[0]) for k, r in ins if k == "EXPOSE" for p in r.split()}
    assert exposed == {DIAMETER_PORT, METRICS_PORT}
    # The request path compiled (setup.py), and the build checks that it is.
    [build] = [r for k, r in ins if k == "RUN" and "EIR_MYPYC=1" in r]
    assert "pip install --no-build-isolation" in build and "(mypyc)" in build
    [health] = [r for k, r in ins if k == "HEALTHCHECK"]
    assert "/healthz" in health and "9868" in health
    assert json.loads([r for k, r in ins if k == "ENTRYPOINT"][-1]) == ["eir-server"]
    for k, r in ins:
        if k == "COPY" and "--from" not in r:
            for src in r.split()[:-1]:
                assert (src in {"pyproject.toml", "setup.py", "README.md"}
                        or (ROOT / src).is_dir()), src
    assert {v for v in dockerfile_env() if v.startswith("EIR_")} <= ENV_VARS
    assert f'org.opencontainers.image.version="{__version__}"' in dict(ins)["LABEL"]
    # the register snapshot's directory exists in the image, owned by its user
    [dirs] = [r for k, r in ins if k == "RUN" and "install -d -o eir" in r]
    assert SNAPSHOT_DIR in dirs.split()


def test_k8s_statefulset_identity_probes_secret_and_image() -> None:
    [sts] = k8s_kind("StatefulSet")
    pod = sts["spec"]["template"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert sts["spec"]["replicas"] >= 2
    [c] = pod["spec"]["containers"]
    assert c["image"] == f"eir-server:{__version__}"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"diameter": DIAMETER_PORT, "metrics": METRICS_PORT}
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # a read-only root file system: the register snapshot needs a volume of its own, on disk
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    [snap] = [v for v in c["volumeMounts"] if v["mountPath"] == SNAPSHOT_DIR]
    [vol] = [v for v in pod["spec"]["volumes"] if v["name"] == snap["name"]]
    assert "medium" not in vol["emptyDir"] and not snap.get("readOnly")
    env = {e["name"]: e for e in c["env"]}
    assert set(env) <= DEPLOY_ENV_VARS | {"POD_NAME"}
    # one Diameter identity per replica: Origin-Host from the pod name
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["EIR_ORIGIN_HOST"]["value"].startswith("$(POD_NAME).")
    # the Redis URL (with its password) from a Secret the README says how to create
    secret = env["EIR_STORE"]["valueFrom"]["secretKeyRef"]["name"]
    readme = (DEPLOY / "k8s/README.md").read_text()
    assert f"kubectl create secret generic {secret}" in readme and "helm install redis" in readme
    anti = pod["spec"]["affinity"]["podAntiAffinity"]
    terms = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert terms[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == \
        sts["spec"]["selector"]["matchLabels"]
    [pdb] = k8s_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["minAvailable"] >= 1
    [cron] = k8s_kind("CronJob")
    [sc] = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert sc["args"][0] == "sync" and "--once" in sc["args"]
    assert sc["image"] == c["image"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    svc_names = {s["metadata"]["name"] for s in k8s_kind("Service")}
    assert sts["spec"]["serviceName"] in svc_names


def test_k8s_network_policy_admits_only_signalling_and_prometheus() -> None:
    [np] = k8s_kind("NetworkPolicy")
    [sts] = k8s_kind("StatefulSet")
    assert np["spec"]["podSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    assert np["spec"]["policyTypes"] == ["Ingress"]
    rules = np["spec"]["ingress"]
    assert all(r.get("from") and r.get("ports") for r in rules)  # no rule admits everyone
    by_port = {p["port"]: r["from"] for r in rules for p in r["ports"]}
    assert set(by_port) == {DIAMETER_PORT, METRICS_PORT}
    assert all("ipBlock" in f for f in by_port[DIAMETER_PORT])
    [prom] = by_port[METRICS_PORT]
    assert prom["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "prometheus"


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((DEPLOY / "systemd" / name).read_text())
    return cp


def test_systemd_units_serve_sync_and_timer() -> None:
    svc = unit("eir-server.service")["Service"]
    argv = shlex.split(svc["ExecStart"])
    assert argv[0].endswith("/eir-server") and argv[1] == "serve"
    assert "HUP" in svc["ExecReload"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": "",
                       "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX"}.items():
        assert svc[key] == value, key
    assert svc.get("DynamicUser") == "yes"
    sync = unit("eir-sync.service")["Service"]
    assert sync["Type"] == "oneshot"
    sargv = shlex.split(sync["ExecStart"])
    assert sargv[1] == "sync" and "--once" in sargv
    assert sync["EnvironmentFile"] == svc["EnvironmentFile"]
    timer = unit("eir-sync.timer")
    assert "Unit" not in timer["Timer"]  # activates eir-sync.service, its namesake
    assert timer["Timer"]["OnCalendar"] and timer["Install"]["WantedBy"] == "timers.target"


def test_serve_options_in_deploy_files_exist() -> None:
    toml = tomllib.loads((DEPLOY / "eir-server.toml").read_text())
    assert set(toml) <= CONFIG_KEYS
    flags = {"--" + k.replace("_", "-") for k in CONFIG_KEYS} | {"--config"}
    [sts] = k8s_kind("StatefulSet")
    argvs = [load_yaml("docker-compose.yml")["services"]["eir"]["command"],
             sts["spec"]["template"]["spec"]["containers"][0]["args"],
             shlex.split(unit("eir-server.service")["Service"]["ExecStart"])[1:]]
    for argv in argvs:
        assert {a for a in argv if a.startswith("--")} <= flags, argv


# --- the effective configurations, run ---------------------------------------------------------


@dataclass
class Effective:
    """One deployment's EIR and sync commands as this machine runs them."""

    name: str
    redis_password: str
    serve_argv: list[str]
    serve_env: dict[str, str]
    sync_argv: list[str]
    sync_env: dict[str, str]
    realm: str
    origin_host: str
    redis_args: list[str] = field(default_factory=list)


DEPLOY_TOML = tomllib.loads((DEPLOY / "eir-server.toml").read_text())
SNAPSHOT_DIR = DEPLOY_TOML["store_snapshot_dir"]


class Machine:
    """Container paths, host names and ports -> this machine's files and free ports."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.redis_port = free_port()
        self.diameter_port = free_port()
        self.metrics_port = free_port()
        self.register = tmp / "register"
        self.dirbs = Dirbs(self.register)
        # a register published just now: its own date is what /readyz ages
        stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime())
        self.dirbs.publish("blacklist", stamp, [[STOLEN, "20200101", "stolen"]])
        self.map: dict[str, str] = {
            "0.0.0.0:3868": f"127.0.0.1:{self.diameter_port}",
            "0.0.0.0:9868": f"127.0.0.1:{self.metrics_port}",
        }
        for host in ("redis", "redis-master", "127.0.0.1"):
            self.map[f"@{host}:6379"] = f"@127.0.0.1:{self.redis_port}"
        # The image's directory for the node's register snapshot (every deployment's config)
        self.snapshot = tmp / "snapshot"
        self.map[SNAPSHOT_DIR] = str(self.snapshot)

    def file(self, container_path: str, text: str) -> None:
        local = self.tmp / "files" / container_path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(self.localize(text))
        self.map[container_path] = str(local)

    def directory(self, container_path: str, local: Path) -> None:
        self.map[container_path] = str(local)

    def localize(self, value: str) -> str:
        for k in sorted(self.map, key=len, reverse=True):
            value = value.replace(k, self.map[k])
        return value

    def env(self, env: dict[str, str]) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("EIR_")}
        return {**base, **{k: self.localize(v) for k, v in env.items()}}


@contextlib.contextmanager
def redis_with_password(m: Machine, password: str, args: list[str]) -> Iterator[None]:
    """redis-server with the deployment's arguments (or just the password) on m.redis_port."""
    extra = args or ["--requirepass", password]
    d = m.tmp / "redis"
    d.mkdir()
    proc = subprocess.Popen([REDIS_SERVER, *extra, "--port", str(m.redis_port), "--bind",
                             "127.0.0.1", "--dir", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=m.redis_port, password=password, socket_timeout=1)
        wait_until(lambda: _ping(client), "redis up", 20)
        with pytest.raises(redis.AuthenticationError):  # the password is really required
            redis.Redis(port=m.redis_port, socket_timeout=1).get("x")
        client.close()
        yield
    finally:
        proc.kill()
        proc.wait(10)


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@contextlib.contextmanager
def http_index(directory: Path) -> Iterator[int]:
    """The register published over HTTP, as a register's web server would (autoindex)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def run_effective(m: Machine, eff: Effective) -> None:
    with redis_with_password(m, eff.redis_password, eff.redis_args):
        serve_log = m.tmp / f"{eff.name}-serve.log"
        proc = subprocess.Popen([*EIR, *eff.serve_argv], env=eff.serve_env,
                                stdout=serve_log.open("wb"), stderr=subprocess.STDOUT)
        try:
            wait_for_port(m.metrics_port, proc, timeout=60)
            # before any sync: serving, healthy, and honestly not ready
            wait_until(lambda: http_get(m.metrics_port, "/healthz")[0] == 200, "healthz", 60,
                       proc)
            status, body = http_get(m.metrics_port, "/readyz")
            assert status == 503 and "register not loaded" in body, body
            r = subprocess.run([*EIR, *eff.sync_argv], env=eff.sync_env, capture_output=True,
                               text=True, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
            assert "Traceback" not in r.stdout + r.stderr
            lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
            assert any(x.get("event") == "sync run done" for x in lines), r.stdout
            wait_until(lambda: http_get(m.metrics_port, "/readyz")[0] == 200, "readyz 200",
                       60, proc)
            # The register snapshot the config asks for: built once, mapped by every worker.
            wait_until(lambda: serve_log.read_text().count('"register snapshot mapped"')
                       >= DEPLOY_TOML["workers"], "register snapshot mapped by every worker", 60, proc)
            assert len(list(m.snapshot.glob("*.snap"))) == 1
            client = S13Client(m.diameter_port, realm=eff.realm)
            assert client.origin_host == eff.origin_host
            assert client.status(STOLEN) == BLACKLISTED
            assert client.status(CLEAN) == WHITELISTED
            client.close()
            # ... and both answered from it, not by a Redis round trip.
            metrics = http_get(m.metrics_port, "/metrics")[1]
            for result in ("hit", "miss"):
                assert re.search(r'^eir_store_lookups_total\{(?=[^}]*tier="snapshot")'
                                 rf'(?=[^}}]*result="{result}")[^}}]*\}} [1-9]', metrics,
                                 re.M), (result, [x for x in metrics.splitlines()
                                                  if x.startswith("eir_store_lookups")])
        except BaseException:
            print(serve_log.read_text()[-4000:])
            raise
        finally:
            stop(proc)
        assert proc.returncode == 0, serve_log.read_text()[-2000:]


def _with_image_env(m: Machine, env: dict[str, str]) -> dict[str, str]:
    image = {k: v for k, v in dockerfile_env().items() if k.startswith(("EIR_", "XDG_"))}
    image["XDG_CACHE_HOME"] = str(m.tmp / "cache")
    return m.env({**image, **env})


def test_compose_deployment_syncs_and_serves(tmp_path: Path) -> None:
    m = Machine(tmp_path)
    secrets = {"REDIS_PASSWORD": "composepw", "GRAFANA_ADMIN_PASSWORD": "x"}
    s = interpolated(load_yaml("docker-compose.yml")["services"], secrets)
    for svc in ("eir", "sync"):  # bind mounts: the files deploy/ ships, the register dir
        for vol in s[svc].get("volumes", []):
            src, dst = vol.split(":")[:2]
            if src.startswith("./") and (DEPLOY / src).is_file():
                m.file(dst, (DEPLOY / src).read_text())
            elif src == "./register":
                m.directory(dst, m.register)
    redis_cmd = s["redis"]["command"]
    assert redis_cmd[0] == "redis-server"
    toml = tomllib.loads((DEPLOY / "eir-server.toml").read_text())
    eff = Effective(
        "compose", "composepw",
        serve_argv=[m.localize(a) for a in s["eir"]["command"]],
        serve_env=_with_image_env(m, s["eir"]["environment"]),
        sync_argv=[m.localize(a) for a in s["sync"]["command"]],
        sync_env=_with_image_env(m, s["sync"]["environment"]),
        realm=toml["origin_realm"], origin_host=toml["origin_host"],
        redis_args=redis_cmd[1:],
    )
    # the long-running sync service loops: run its command once (same flags but --interval)
    i = eff.sync_argv.index("--interval")
    eff.sync_argv[i:i + 2] = ["--once"]
    run_effective(m, eff)


def test_kubernetes_deployment_syncs_and_serves(tmp_path: Path) -> None:
    m = Machine(tmp_path)
    [cm] = k8s_kind("ConfigMap")
    [sts] = k8s_kind("StatefulSet")
    [cron] = k8s_kind("CronJob")
    pod = sts["spec"]["template"]["spec"]
    [c] = pod["containers"]
    for mount in c["volumeMounts"]:
        [vol] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        if "configMap" in vol:
            for key, text in cm["data"].items():
                m.file(f"{mount['mountPath']}/{key}", text)
    # the Secret as the README creates it, for a Redis with password k8spw
    readme = (DEPLOY / "k8s/README.md").read_text()
    url = re.search(r'--from-literal=url="([^"]+)"', readme).group(1)  # type: ignore[union-attr]
    secret = {"url": url.replace("${PASSWORD}", "k8spw")}
    pod_name = f"{sts['metadata']['name']}-0"

    def container_env(container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for e in container.get("env", []):
            if "value" in e:  # $(VAR) refers to variables defined before it
                env[e["name"]] = re.sub(r"\$\(([A-Z_]+)\)", lambda x: env[x.group(1)],
                                        e["value"])
                continue
            ref = e["valueFrom"]
            if "fieldRef" in ref:
                assert ref["fieldRef"]["fieldPath"] == "metadata.name"
                env[e["name"]] = pod_name
            elif "secretKeyRef" in ref:
                env[e["name"]] = secret[ref["secretKeyRef"]["key"]]
            else:
                cmref = ref["configMapKeyRef"]
                assert cmref["name"] == cm["metadata"]["name"]
                env[e["name"]] = cm["data"][cmref["key"]]
        return env

    def expand(args: list[str], env: dict[str, str]) -> list[str]:
        return [re.sub(r"\$\(([A-Z_]+)\)", lambda x: env[x.group(1)], a) for a in args]

    [sc] = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    senv = container_env(sc)
    eenv = container_env(c)
    toml = tomllib.loads(cm["data"]["eir-server.toml"])
    with http_index(m.register) as hport:
        # the register's HTTPS index, here served over plain HTTP on this machine
        m.map[cm["data"]["sync-source"]] = f"http://127.0.0.1:{hport}/"
        eff = Effective(
            "k8s", "k8spw",
            serve_argv=[m.localize(a) for a in expand(c["args"], eenv)],
            serve_env=_with_image_env(m, eenv),
            sync_argv=[m.localize(a) for a in expand(sc["args"], senv)],
            sync_env=_with_image_env(m, senv),
            realm=toml["origin_realm"], origin_host=f"{pod_name}.eir.example.net",
        )
        assert eff.serve_env["EIR_ORIGIN_HOST"] == eff.origin_host
        run_effective(m, eff)


def test_systemd_deployment_syncs_and_serves(tmp_path: Path) -> None:
    m = Machine(tmp_path)
    toml_text = (DEPLOY / "eir-server.toml").read_text()
    m.file("/etc/eir-server/eir-server.toml", toml_text)
    envfile: dict[str, str] = {}
    for line in (DEPLOY / "systemd/eir-server.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition("=")
            envfile[k] = v
    password = re.match(r"redis://:([^@]+)@", envfile["EIR_STORE"]).group(1)  # type: ignore[union-attr]
    m.directory(envfile["EIR_SYNC_SOURCE"], m.register)
    m.directory("/var/cache/eir-sync", tmp_path / "cache")

    def unit_command(name: str) -> tuple[list[str], dict[str, str]]:
        svc = unit(name)["Service"]
        env: dict[str, str] = {}
        for item in shlex.split(svc.get("Environment", "")):
            k, _, v = item.partition("=")
            env[k] = v
        assert svc["EnvironmentFile"] == "/etc/eir-server/eir-server.env"
        env.update(envfile)
        argv = shlex.split(svc["ExecStart"])
        assert argv[0] == "/opt/eir-server/bin/eir-server"
        # systemd expands ${VAR} in ExecStart from the unit's environment
        argv = [re.sub(r"\$\{([A-Z_]+)\}", lambda x: env[x.group(1)], a) for a in argv[1:]]
        return [m.localize(a) for a in argv], m.env(env)

    serve_argv, serve_env = unit_command("eir-server.service")
    sync_argv, sync_env = unit_command("eir-sync.service")
    toml = tomllib.loads(toml_text)
    run_effective(m, Effective("systemd", password, serve_argv, serve_env, sync_argv, sync_env,
                               realm=toml["origin_realm"], origin_host=toml["origin_host"]))


def test_serve_flags_match_the_cli() -> None:
    res = subprocess.run([*EIR, "serve", "--help"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    flags = set(re.findall(r"(--[a-z][a-z0-9-]+)", res.stdout))
    assert {"--" + k.replace("_", "-") for k in CONFIG_KEYS} <= flags
