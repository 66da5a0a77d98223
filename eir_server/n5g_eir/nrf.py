"""NRF registration of this 5G-EIR (TS 29.510 Nnrf_NFManagement, 5.2.2.2 / 5.2.2.3 / 5.2.2.4).
Pure code: what to send next and when; the shell does the HTTP and passes time in.

    UNREGISTERED --(deadline)--> PUT nf-instances/{id} (NFRegister, NFProfile)
        200/201 -> REGISTERED, heart-beat after the NRF's heartBeatTimer (ours if absent)
        else / unreachable -> retry after a backoff (1, 2, 4 ... 30 s)
    REGISTERED --(deadline)--> PATCH nf-instances/{id} (heart-beat, nfStatus REGISTERED)
        204/200 -> next heart-beat after heartBeatTimer
        404 -> UNREGISTERED, register again now (the NRF lost us: 5.2.2.3.2)
        else / unreachable -> try again after min(heartBeatTimer, backoff)
    stop() -> DELETE nf-instances/{id} (NFDeregister) when a registration was made

The NRF being unreachable never touches answering: the shell runs this beside the listeners.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

NF_TYPE = "5G_EIR"
SERVICE_NAME = "n5g-eir-eic"
API_VERSION = "v1"
API_FULL_VERSION = "1.3.0-alpha.1"  # info.version of the TS 29.511 document served (Rel-18)
BACKOFF_MAX = 30.0


class NrfRequest(NamedTuple):
    method: str
    path: str  # relative to the NRF's {apiRoot}/nnrf-nfm/v1/
    body: bytes | None
    content_type: str | None


class State(Enum):
    UNREGISTERED = "unregistered"
    REGISTERED = "registered"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Endpoint:
    address: str  # IPv4 or IPv6 literal advertised to consumers
    port: int
    scheme: str  # "http" (h2c) or "https"


def nf_profile(nf_instance_id: str, endpoints: list[Endpoint], heartbeat: int,
               fqdn: str = "") -> dict[str, Any]:
    """Our NFProfile (TS 29.510 6.1.6.2.2) with one NFService per scheme (6.1.6.2.3)."""
    services = []
    addresses = sorted({e.address for e in endpoints})
    for i, scheme in enumerate(sorted({e.scheme for e in endpoints})):
        svc: dict[str, Any] = {
            "serviceInstanceId": f"{SERVICE_NAME}-{scheme}-{i}",
            "serviceName": SERVICE_NAME,
            "versions": [{"apiVersionInUri": API_VERSION, "apiFullVersion": API_FULL_VERSION}],
            "scheme": scheme,
            "nfServiceStatus": "REGISTERED",
            "ipEndPoints": [_ip_end_point(e) for e in endpoints if e.scheme == scheme],
        }
        if fqdn:
            svc["fqdn"] = fqdn
        services.append(svc)
    profile: dict[str, Any] = {
        "nfInstanceId": nf_instance_id,
        "nfType": NF_TYPE,
        "nfStatus": "REGISTERED",
        "heartBeatTimer": heartbeat,
        "nfServices": services,
    }
    v4 = [a for a in addresses if ":" not in a]
    v6 = [a for a in addresses if ":" in a]
    if v4:
        profile["ipv4Addresses"] = v4
    if v6:
        profile["ipv6Addresses"] = v6
    if fqdn:
        profile["fqdn"] = fqdn
    return profile


def _ip_end_point(e: Endpoint) -> dict[str, Any]:
    key = "ipv6Address" if ":" in e.address else "ipv4Address"
    return {key: e.address, "transport": "TCP", "port": e.port}


class NrfRegistration:
    """The registration's state machine; `now` is a monotonic time in seconds."""

    def __init__(self, profile: dict[str, Any], now: float) -> None:
        self.profile = profile
        self.nf_instance_id: str = profile["nfInstanceId"]
        self.heartbeat = float(profile["heartBeatTimer"])
        self.state = State.UNREGISTERED
        self.deadline: float | None = now
        self.failures = 0
        self.ever_registered = False
        self.in_progress: NrfRequest | None = None
        self.last_error = ""

    @property
    def resource(self) -> str:
        return f"nf-instances/{self.nf_instance_id}"

    def next_deadline(self) -> float | None:
        return None if self.in_progress is not None else self.deadline

    def poll(self, now: float) -> NrfRequest | None:
        """The request to send now, if its time has come and none is outstanding."""
        if self.in_progress is not None or self.deadline is None or now < self.deadline:
            return None
        if self.state is State.UNREGISTERED:
            req = NrfRequest("PUT", self.resource, json.dumps(self.profile).encode(),
                             "application/json")
        elif self.state is State.REGISTERED:
            patch = [{"op": "replace", "path": "/nfStatus", "value": "REGISTERED"}]
            req = NrfRequest("PATCH", self.resource, json.dumps(patch).encode(),
                             "application/json-patch+json")
        else:
            return None
        self.in_progress = req
        return req

    def on_response(self, status: int, body: bytes, now: float) -> None:
        req, self.in_progress = self.in_progress, None
        if req is None or self.state is State.STOPPED:
            return
        if req.method == "PUT" and status in (200, 201):
            self.state = State.REGISTERED
            self.ever_registered = True
            self.failures = 0
            self.heartbeat = _heartbeat_from(body, self.heartbeat)
            self.deadline = now + self.heartbeat
        elif req.method == "PATCH" and status in (200, 204):
            self.failures = 0
            if status == 200:
                self.heartbeat = _heartbeat_from(body, self.heartbeat)
            self.deadline = now + self.heartbeat
        elif req.method == "PATCH" and status == 404:
            self.state = State.UNREGISTERED
            self.deadline = now
            self.last_error = "NRF no longer knows this NF instance (404): registering again"
        else:
            self._failed(now, f"{req.method} answered {status}")

    def on_failure(self, reason: str, now: float) -> None:
        """The request could not be sent or answered (NRF unreachable, timeout)."""
        req, self.in_progress = self.in_progress, None
        if req is None or self.state is State.STOPPED:
            return
        self._failed(now, f"{req.method} failed: {reason}")

    def _failed(self, now: float, reason: str) -> None:
        self.failures += 1
        self.last_error = reason
        backoff = min(BACKOFF_MAX, 2.0 ** (self.failures - 1))
        if self.state is State.REGISTERED:
            backoff = min(backoff, self.heartbeat)
        self.deadline = now + backoff

    def stop(self) -> NrfRequest | None:
        """Graceful shutdown: the NFDeregister to send, if we ever registered."""
        was_registered = self.ever_registered
        self.state = State.STOPPED
        self.deadline = None
        self.in_progress = None
        if not was_registered:
            return None
        return NrfRequest("DELETE", self.resource, None, None)


def _heartbeat_from(body: bytes, default: float) -> float:
    """The NRF may change heartBeatTimer in the NFProfile it returns (TS 29.510 5.2.2.2.2)."""
    try:
        value = json.loads(body).get("heartBeatTimer")
    except (ValueError, AttributeError):
        return default
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return float(value)
    return default


def load_nf_instance_id(path: str) -> tuple[str, bool]:
    """The NF instance id kept in `path` (created with a new UUID the first time), so the NRF
    sees the same NF across restarts. Returns (id, stored): stored is False when the file could
    not be written, and the id then lasts for this run only."""
    p = Path(path)
    try:
        text = p.read_text().strip()
        return str(uuid.UUID(text)), True
    except ValueError:
        raise ValueError(f"nf_instance_file {path}: not a UUID") from None
    except OSError:  # absent (or unreadable: then writing fails too and the caller says so)
        pass
    new = str(uuid.uuid4())
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(new + "\n")
        tmp.replace(p)
    except OSError:
        return new, False
    return new, True
