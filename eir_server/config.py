"""One frozen, validated configuration for `eir-server serve`.

Every option has one name and three spellings: the command-line flag `--diameter-listen`, the
TOML key `diameter_listen` (top level of `--config FILE`), and the environment variable
`EIR_DIAMETER_LISTEN`. Precedence: flag > environment > file > default. The `[policy]` TOML
table configures the verdict policy (docs/policy.md). Standard library only.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

STATUSES = ("whitelisted", "greylisted", "blacklisted", "unknown")


def _opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
         metavar: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices,
                                            "metavar": metavar})


@dataclass(frozen=True)
class ServeConfig:
    diameter_listen: str = _opt("0.0.0.0:3868", "S13 Diameter listen address (TCP); empty "
                                "disables cleartext Diameter (needs --diameter-tls-listen)",
                                metavar="HOST:PORT")
    diameter_tls_listen: str = _opt("", "S13 Diameter over TLS listen address (RFC 6733 "
                                    "13.1; commonly port 5868); empty disables. Needs "
                                    "--tls-cert and --tls-key", metavar="HOST:PORT")
    tls_cert: str = _opt("", "PEM certificate chain of this node for TLS", metavar="FILE")
    tls_key: str = _opt("", "PEM private key of this node for TLS", metavar="FILE")
    tls_ca: str = _opt("", "PEM CA bundle: when set, TLS peers must present a certificate it "
                       "signed (mutual TLS)", metavar="FILE")
    http_listen: str = _opt("", "N5g-eir (TS 29.511) HTTP listen address: HTTP/2 with prior "
                            "knowledge (h2c) and HTTP/1.1; empty disables (make run: "
                            "0.0.0.0:8080)", metavar="HOST:PORT")
    http_tls_listen: str = _opt("", "N5g-eir over TLS (HTTP/2 by ALPN, HTTP/1.1) listen address; "
                                "empty disables. Needs --http-tls-cert/--http-tls-key (or "
                                "--tls-cert/--tls-key)", metavar="HOST:PORT")
    http_tls_cert: str = _opt("", "PEM certificate chain for N5g-eir TLS (default: --tls-cert)",
                              metavar="FILE")
    http_tls_key: str = _opt("", "PEM private key for N5g-eir TLS (default: --tls-key)",
                             metavar="FILE")
    http_tls_ca: str = _opt("", "PEM CA bundle: when set, N5g-eir TLS clients must present a "
                            "certificate it signed (mutual TLS; default: --tls-ca)",
                            metavar="FILE")
    nrf_url: str = _opt("", "NRF apiRoot (http:// for h2c, https://); when set, worker 0 "
                        "registers this node as a 5G_EIR NF instance (TS 29.510), sends "
                        "heart-beats and deregisters on shutdown", metavar="URL")
    nrf_heartbeat: int = _opt(60, "heartBeatTimer offered to the NRF, seconds (the NRF's answer "
                              "decides)", metavar="SECONDS")
    nf_instance_id: str = _opt("", "NF instance id (UUID) for the NRF and OAuth2 token audience; "
                               "empty: the one kept in --nf-instance-file", metavar="UUID")
    nf_instance_file: str = _opt("/var/lib/eir-server/nf-instance-id", "file keeping the NF "
                                 "instance id across restarts (created with a new UUID)",
                                 metavar="FILE")
    nf_address: str = _opt("", "IP address advertised to the NRF (default: the N5g-eir listen "
                           "address; 127.0.0.1 when listening on all addresses)", metavar="IP")
    nf_fqdn: str = _opt("", "FQDN advertised to the NRF; empty: none", metavar="FQDN")
    oauth2_public_key: str = _opt("", "PEM public key verifying OAuth2 access tokens on N5g-eir; "
                                  "set (or --oauth2-jwks): requests need a valid bearer token",
                                  metavar="FILE")
    oauth2_jwks: str = _opt("", "JWKS file (JSON) of keys verifying OAuth2 access tokens, "
                            "chosen by kid", metavar="FILE")
    tls_peer_identity: str = _opt(
        "off", "origin-host: a TLS peer's CER Origin-Host must be one of its certificate's "
        "DNS names (subjectAltName, else CN), else CEA 3010. Needs --tls-ca",
        choices=("off", "origin-host"))
    tls_handshake_timeout: float = _opt(10.0, "seconds a TLS peer has to complete its "
                                        "handshake (failures are logged with the peer "
                                        "address), and a new N5g-eir connection to send its "
                                        "HTTP/2 preface or first HTTP/1.1 request",
                                        metavar="SECONDS")
    max_connections: int = _opt(1024, "connections per worker, for Diameter and for each "
                                "N5g-eir listener; more are closed at accept", metavar="N")
    max_connections_per_source: int = _opt(64, "connections per peer IP address (per worker), "
                                           "for Diameter and for each N5g-eir listener; more "
                                           "are closed at accept", metavar="N")
    overload_target_delay: float = _opt(
        0.05, "queueing delay (seconds) above which a worker sheds load: excess ECRs get 3004 "
        "at once, fairly per peer, and DOIC peers an OC-OLR; N5g-eir requests 503 with "
        "Retry-After; 0 disables shedding",
        metavar="SECONDS")
    write_stall_timeout: float = _opt(10.0, "seconds a peer may leave its answers unread "
                                      "(512 KiB buffered, reading from it paused) before its "
                                      "connection is aborted", metavar="SECONDS")
    origin_host_check: str = _opt(
        "log", "an ECR whose Origin-Host differs from the peer's CER Origin-Host: off, log "
        "(counted, logged rate-limited), or refuse (5003). Behind a DRA they differ by design",
        choices=("off", "log", "refuse"))
    origin_host: str = _opt("eir.localdomain", "our Diameter Origin-Host (DiameterIdentity)")
    origin_realm: str = _opt("localdomain", "our Diameter Origin-Realm")
    host_ip_addresses: str = _opt(
        "", "Host-IP-Address values advertised in CEA, comma separated "
        "(default: the listen address, or 127.0.0.1 when listening on all addresses)")
    workers: int = _opt(1, "worker processes sharing the Diameter port (SO_REUSEPORT)")
    unknown_equipment: str = _opt(
        "whitelisted", "verdict for an IMEI no list mentions; 'unknown' answers S13 "
        "Experimental-Result 5422 DIAMETER_ERROR_EQUIPMENT_UNKNOWN", choices=STATUSES)
    store: str = _opt("memory://", "verdict store: memory:// (embedded) or a Redis URL "
                      "(redis://, rediss://, redis+sentinel://, redis+cluster://)", metavar="URL")
    register: str = _opt("", "directory of national-register files (DIRBS zips/CSVs) loaded "
                         "into the embedded store at start", metavar="DIR")
    register_snapshot_dir: str = _opt(
        "", "where the embedded register's snapshot file is kept (in a private subdirectory "
        "eir-register-<uid>): built once per node and register, mapped by every worker; empty: "
        "the system temp directory; off: every worker loads the register itself",
        metavar="DIR")
    store_snapshot_dir: str = _opt(
        "", "with a Redis store: directory (local disk, the same for every worker of a node) "
        "of the node's register snapshot, the store URL option snapshot_dir, which this "
        "overrides: misses answered without a Redis round trip, and through a Redis outage "
        "from the last-known-good copy instead of --store-fallback; empty: the URL decides "
        "(default off)", metavar="DIR")
    store_fallback: str = _opt(
        "whitelisted", "answer when the store cannot (Redis down, IMEI not cached): a status "
        "(whitelisted fails open; greylisted/blacklisted fail closed), or an error answer: "
        "too_busy (S13 3004: the MME tries another EIR) or unable_to_comply (5012)",
        choices=(*STATUSES, "too_busy", "unable_to_comply"))
    ready_during_fallback: str = _opt(
        "off", "keep /readyz 200 while the store is unreachable and answers come from "
        "--store-fallback (off: /readyz fails, so an orchestrator or monitor sees it)",
        choices=("off", "on"))
    metrics_listen: str = _opt("0.0.0.0:9868", "Prometheus /metrics, /healthz, /readyz "
                               "listen address; empty disables", metavar="HOST:PORT")
    max_register_age: float = _opt(0.0, "/readyz fails when the register is older than this "
                                   "many seconds; 0 disables the check", metavar="SECONDS")
    log_format: str = _opt("auto", "log format: JSON, console, or auto (console on a TTY)",
                           choices=("auto", "json", "console"))
    log_level: str = _opt("info", "log level", choices=("debug", "info", "warning", "error"))
    allowed_peers: str = _opt("", "Origin-Host patterns (fnmatch, comma separated) allowed to "
                              "connect; others get CEA 3010. Empty: any", metavar="PATTERNS")
    allowed_networks: str = _opt("", "peer source networks (CIDR, comma separated) allowed to "
                                 "connect; empty: any", metavar="CIDRS")
    watchdog_interval: float = _opt(30.0, "RFC 3539 watchdog Tw in seconds (>= 6, jitter "
                                    "+-2 s added)", metavar="SECONDS")
    max_message_length: int = _opt(65535, "largest Diameter message accepted; a larger "
                                   "Message-Length closes the connection", metavar="BYTES")
    duplicate_window: float = _opt(240.0, "seconds a T-flag retransmission is answered from "
                                   "the duplicate cache", metavar="SECONDS")
    duplicate_max_entries: int = _opt(2_000_000, "duplicate-detection cache size (entries)",
                                      metavar="N")
    duplicate_max_bytes: int = _opt(64 * 1024 * 1024, "duplicate-detection cache memory per "
                                    "worker (~120 bytes an answer); a retransmission that fell "
                                    "out is checked again", metavar="BYTES")
    max_in_flight: int = _opt(10_000, "requests waiting for the store (per worker) above "
                              "which new ECRs are answered 3004 DIAMETER_TOO_BUSY", metavar="N")
    shutdown_timeout: float = _opt(10.0, "SIGTERM: seconds to wait for DPA and in-flight "
                                   "answers before closing", metavar="SECONDS")
    audit: str = _opt("off", "record every check as an observation (Redis Stream or "
                      "embedded buffer)", choices=("off", "on"))
    audit_sample: float = _opt(1.0, "share of checks recorded when --audit on (0..1)",
                               metavar="FLOAT")
    audit_dir: str = _opt("", "with the embedded store: write observations as daily JSON-lines "
                          "files here (default: a bounded in-memory buffer)", metavar="DIR")
    device_signals: str = _opt("on", "count and log clone / device-change signals",
                               choices=("off", "on"))
    log_identities: str = _opt("off", "write full IMEIs and IMSIs in log lines (device "
                               "signals); off: only the TAC and the IMSI's MCC+MNC, as these "
                               "are subscribers' security data", choices=("off", "on"))
    device_signal_max_imsis: int = _opt(2, "signal an IMEI seen with more than this many IMSIs "
                                        "within the window", metavar="N")
    device_signal_window: float = _opt(86400.0, "window of the device signals, seconds",
                                       metavar="SECONDS")
    device_signal_max_devices: int = _opt(1_000_000, "IMEIs, and as many IMSIs, the device "
                                          "signals remember per worker (least recently seen "
                                          "forgotten first); ~120 bytes each when full",
                                          metavar="N")
    policy: Mapping[str, Any] = field(default_factory=dict,
                                      metadata={"help": None, "choices": None, "metavar": None})

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}: {getattr(self, f.name)!r} not one of "
                                 f"{', '.join(choices)}")
        if self.diameter_listen:
            parse_hostport(self.diameter_listen, "diameter_listen")
        elif not self.diameter_tls_listen:
            raise ValueError("diameter_listen: empty only with diameter_tls_listen (no listener)")
        if self.tls_peer_identity != "off" and not self.tls_ca:
            raise ValueError("tls_peer_identity needs tls_ca (peers must present certificates)")
        if self.metrics_listen:
            parse_hostport(self.metrics_listen, "metrics_listen")
        if self.diameter_tls_listen:
            parse_hostport(self.diameter_tls_listen, "diameter_tls_listen")
            if not (self.tls_cert and self.tls_key):
                raise ValueError("diameter_tls_listen needs tls_cert and tls_key")
        for name in ("http_listen", "http_tls_listen"):
            if getattr(self, name):
                parse_hostport(getattr(self, name), name)
        if self.http_tls_listen and not (self.http_tls_cert_file and self.http_tls_key_file):
            raise ValueError("http_tls_listen needs http_tls_cert and http_tls_key "
                             "(or tls_cert and tls_key)")
        if self.nrf_url:
            if not self.nrf_url.startswith(("http://", "https://")):
                raise ValueError("nrf_url: expected http://... or https://...")
            if not (self.http_listen or self.http_tls_listen):
                raise ValueError("nrf_url needs http_listen or http_tls_listen (the service "
                                 "to register)")
        if self.nrf_heartbeat < 1:
            raise ValueError("nrf_heartbeat: at least 1 second")
        if self.nf_instance_id:
            import uuid
            try:
                uuid.UUID(self.nf_instance_id)
            except ValueError:
                raise ValueError("nf_instance_id: not a UUID") from None
        if self.max_connections < 1 or self.max_connections_per_source < 1 or \
                self.tls_handshake_timeout <= 0 or self.write_stall_timeout <= 0 or \
                self.overload_target_delay < 0:
            raise ValueError("max_connections, max_connections_per_source, "
                             "tls_handshake_timeout and write_stall_timeout must be positive")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight: must be at least 1")
        if self.workers < 1:
            raise ValueError("workers: must be at least 1")
        if self.watchdog_interval < 6:
            raise ValueError("watchdog_interval: RFC 3539 requires at least 6 seconds")
        if (self.device_signal_max_imsis < 1 or self.device_signal_window <= 0
                or self.device_signal_max_devices < 1):
            raise ValueError("device_signal_max_imsis, device_signal_window and "
                             "device_signal_max_devices must be positive")
        if not 0.0 <= self.audit_sample <= 1.0:
            raise ValueError("audit_sample: must be between 0 and 1")
        if self.max_message_length < 20:
            raise ValueError("max_message_length: at least 20 (the Diameter header)")
        if not self.origin_host or not self.origin_realm:
            raise ValueError("origin_host and origin_realm must not be empty")

    @property
    def http_tls_cert_file(self) -> str:
        return self.http_tls_cert or self.tls_cert

    @property
    def http_tls_key_file(self) -> str:
        return self.http_tls_key or self.tls_key

    @property
    def http_tls_ca_file(self) -> str:
        return self.http_tls_ca or self.tls_ca

    def host_ips(self) -> tuple[str, ...]:
        if self.host_ip_addresses:
            return tuple(a.strip() for a in self.host_ip_addresses.split(",") if a.strip())
        listen = self.diameter_listen or self.diameter_tls_listen
        host, _ = parse_hostport(listen, "diameter_listen")
        return ("127.0.0.1",) if host in ("", "0.0.0.0", "::") else (host,)


OPTIONS = [f for f in fields(ServeConfig) if f.name != "policy"]


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what}: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _coerce(name: str, value: Any, typ: Any) -> Any:
    t = typ if isinstance(typ, type) else {"str": str, "int": int, "float": float}.get(typ, str)
    try:
        if t is int:
            return int(value)
        if t is float:
            return float(value)
        if isinstance(value, list):
            return ",".join(str(v) for v in value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r} is not a valid {t.__name__}") from None


def load_config(file: str | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> ServeConfig:
    """Defaults < TOML file < EIR_* environment < explicit command-line overrides."""
    values: dict[str, Any] = {}
    known = {f.name: f for f in OPTIONS}
    if file:
        with open(file, "rb") as fh:
            data = tomllib.load(fh)
        for k, v in data.items():
            if k == "policy":
                if not isinstance(v, dict):
                    raise ValueError("[policy] must be a table")
                values["policy"] = v
                continue
            if k not in known:
                raise ValueError(f"{file}: unknown option {k!r}")
            values[k] = _coerce(k, v, known[k].type)
    env = os.environ if env is None else env
    for name, f in known.items():
        var = "EIR_" + name.upper()
        if var in env:
            values[name] = _coerce(var, env[var], f.type)
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = _coerce(k, v, known[k].type)
    return replace(ServeConfig(), **values)
