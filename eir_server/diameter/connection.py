"""Sans-I/O Diameter peer connection, responder side (RFC 6733 section 5, RFC 3539 watchdog).

Three calls drive it, as in h11/h2: `receive_data(bytes, now)` feeds the stream, `events()`
takes what happened (application requests, peer up/down, protocol errors), `data_to_send()`
takes bytes for the socket. Time is an argument: `next_deadline()` tells the shell when to call
`handle_timer(now)`. No sockets, no clock, no asyncio here.

The connection answers the base protocol itself (CER, DWR, DPR, DWA/DPA it asked for) and the
errors every application shares (unknown application or command, bad header bits, malformed AVPs,
Destination-Host/Realm not ours); only well-formed application requests reach the application.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from . import errors
from .answers import (
    AUTH_SESSION_STATE,
    NO_STATE_MAINTAINED,
    ORIGIN_STATE_ID,
    RESULT_CODE,
    Identity,
    error_answer,
    frame,
)
from .codec import (
    FLAG_E,
    FLAG_P,
    FLAG_R,
    HEADER,
    VEND,
    VSTART,
    Avp,
    Framer,
    Message,
    Problem,
    Slots,
    address_payload,
    avp,
    decode,
    decode_fast,
    grouped_avp,
    message,
    str_avp,
    u32_avp,
    validate,
)
from .dictionary import Dictionary, Grammar
from .shed import BASE_APP

CER, DWR, DPR = 257, 280, 282
BASE_APPLICATION: Final = 0
RELAY_APPLICATION: Final = 0xFFFFFFFF
VENDOR_3GPP: Final = 10415
S13_APPLICATION: Final = 16777252
AUTH_APPLICATION_ID: Final = 258
ACCT_APPLICATION_ID: Final = 259
VENDOR_SPECIFIC_APPLICATION_ID: Final = 260
VENDOR_ID: Final = 266
ORIGIN_HOST: Final = 264
ORIGIN_REALM: Final = 296
DESTINATION_HOST: Final = 293
DESTINATION_REALM: Final = 283
DISCONNECT_CAUSE: Final = 273
HOST_IP_ADDRESS: Final = 257
PRODUCT_NAME: Final = 269
FIRMWARE_REVISION: Final = 267
SUPPORTED_VENDOR_ID: Final = 265
OC_SUPPORTED_FEATURES: Final = 621
INBAND_SECURITY_ID: Final = 299
NO_INBAND_SECURITY: Final = 0
REBOOTING, BUSY, DO_NOT_WANT_TO_TALK_TO_YOU = 0, 1, 2
DISCONNECT_CAUSES = {0: "REBOOTING", 1: "BUSY", 2: "DO_NOT_WANT_TO_TALK_TO_YOU"}
# Messages handled per receive_data call: bounded work per read, so a peer that sends a burst
# gets its turn like the others (64 ECRs are well under a millisecond).
MAX_MESSAGES_PER_CALL: Final = 64
# A 3004 from a template costs a few percent of a check: this many refusals count as one
# handled message against MAX_MESSAGES_PER_CALL.
REFUSALS_PER_CHECK: Final = 16


@dataclass(frozen=True)
class PeerConfig:
    """What a connection needs to know about us and whom we accept. Immutable, shared."""

    identity: Identity
    host_ip_addresses: tuple[str, ...] = ("127.0.0.1",)
    vendor_id: int = 0
    product_name: str = "eir-server"
    firmware_revision: int = 1
    # (vendor id or 0, application id) pairs we serve; Relay in a CER also matches.
    applications: tuple[tuple[int, int], ...] = ((VENDOR_3GPP, S13_APPLICATION),)
    allowed_hosts: tuple[str, ...] = ()  # fnmatch patterns of Origin-Host; empty: anyone
    allowed_networks: tuple[str, ...] = ()  # CIDRs of peer addresses; empty: anywhere
    watchdog_interval: float = 30.0  # Tw (RFC 3539 3.4.1)
    watchdog_jitter: float = 2.0
    cer_timeout: float = 10.0  # a connection that sends no CER by then is closed
    dpa_timeout: float = 5.0
    max_message_length: int = 65_535
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.watchdog_interval < 6.0:
            raise ValueError("watchdog interval (Tw) must be at least 6 s (RFC 3539 3.4.1)")
        if not 0 <= self.watchdog_jitter <= 2.0:
            raise ValueError("watchdog jitter must be between 0 and 2 s (RFC 3539 3.4.1)")
        nets = tuple(ipaddress.ip_network(n, strict=False) for n in self.allowed_networks)
        object.__setattr__(self, "_networks", nets)

    def address_allowed(self, address: str | None) -> bool:
        if not self._networks:
            return True
        if address is None:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in n for n in self._networks)

    def host_allowed(self, origin_host: str) -> bool:
        if not self.allowed_hosts:
            return True
        host = origin_host.lower()
        return any(fnmatch.fnmatchcase(host, p.lower()) for p in self.allowed_hosts)


# ---------------------------------------------------------------------------------------------
# Events the shell receives


@dataclass(frozen=True, slots=True)
class PeerOpened:
    origin_host: str
    origin_realm: str
    applications: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CerRejected:
    result_code: int
    reason: str
    origin_host: str


class AppRequest:
    """One per request: a plain class, because a dataclass's generated __init__ stays
    interpreted Python even in the compiled build."""

    __slots__ = ("message",)
    __match_args__ = ("message",)

    def __init__(self, message: Message) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"AppRequest(message={self.message!r})"


@dataclass(frozen=True, slots=True)
class ErrorAnswered:
    """A request we answered with a failure because of what the peer sent (log once, count)."""

    result_code: int
    command: int
    hop_by_hop: int
    reason: str


@dataclass(frozen=True, slots=True)
class WatchdogChanged:
    old: str
    new: str


@dataclass(frozen=True, slots=True)
class DisconnectRequested:
    """The peer sent DPR; we answered DPA and will close."""

    cause: str


@dataclass(frozen=True, slots=True)
class Closed:
    """The shell must close the transport once `data_to_send()` is flushed."""

    reason: str
    # The peer caused it and can again on every connection (bad framing, no CER, a request
    # before CER, a rejected CER): lines about it are rate-limited per peer
    peer_caused: bool = False


Event = PeerOpened | CerRejected | AppRequest | ErrorAnswered | WatchdogChanged | \
    DisconnectRequested | Closed


class PeerState(Enum):
    """RFC 6733 5.6, responder states. Wait-* and I-* states belong to initiators."""

    CLOSED = "Closed"  # transport up, no CER yet
    R_OPEN = "R-Open"
    CLOSING = "Closing"  # we sent DPR and wait for DPA
    DONE = "Done"  # terminal: the transport is (to be) closed


class Watchdog(Enum):
    """RFC 3539 3.4.1 states. DOWN and REOPEN matter to an initiator that reconnects; a responder
    closes the transport on DOWN and the peer reconnects."""

    INITIAL = "INITIAL"
    OKAY = "OKAY"
    SUSPECT = "SUSPECT"
    DOWN = "DOWN"


# RFC 6733 5.6, the responder's rows (R-Conn-CER is our accept of a transport with a CER on it):
#   Closed    R-Conn-CER    R-Accept, Process-CER, R-Snd-CEA   R-Open
#   R-Open    R-Rcv-Message Process                             R-Open
#   R-Open    R-Rcv-DWR     Process-DWR, R-Snd-DWA              R-Open
#   R-Open    R-Rcv-DWA     Process-DWA                         R-Open
#   R-Open    R-Rcv-CER     R-Snd-CEA                           R-Open
#   R-Open    Stop          R-Snd-DPR                           Closing
#   R-Open    R-Rcv-DPR     R-Snd-DPA, R-Disc                   Closed
#   R-Open    R-Peer-Disc   R-Disc                              Closed
#   Closing   R-Rcv-DPA     R-Disc                              Closed
#   Closing   Timeout       Error                               Closed
#   (any)     R-Peer-Disc   R-Disc                              Closed
# The responder's Closed splits in two here: CLOSED (transport up, no CER yet) and DONE (the
# transport is closed or about to be); the RFC's Closed after a disconnect is our DONE.
# Deviations, labelled: a CER that fails (3010, 5010, bad AVPs) is answered and closes (the RFC's
# "Process-CER" leaves the rejection implicit); any other message in Closed is a peer that skipped
# the capabilities exchange: requests get 3010 DIAMETER_UNKNOWN_PEER, then we close. In Closing
# we still answer requests that crossed our DPR (RFC 6733 5.4 lets in-flight answers drain). A byte
# stream that cannot be framed closes the transport in any state ("framing-error"), as does Stop
# before the capabilities exchange. The actions are the methods that call `_transition`; every
# state change goes through this table. The fast path (`_fast_request`) runs only in R-Open,
# whose rcv-message row keeps R-Open, so it changes no state (tests/diameter/test_connection.py
# checks the row).
TRANSITIONS: dict[tuple[PeerState, str], PeerState] = {
    (PeerState.CLOSED, "rcv-CER-ok"): PeerState.R_OPEN,
    (PeerState.CLOSED, "rcv-CER-bad"): PeerState.DONE,
    (PeerState.CLOSED, "rcv-other"): PeerState.DONE,
    (PeerState.CLOSED, "timeout"): PeerState.DONE,
    (PeerState.CLOSED, "stop"): PeerState.DONE,
    (PeerState.R_OPEN, "rcv-message"): PeerState.R_OPEN,
    (PeerState.R_OPEN, "rcv-DWR"): PeerState.R_OPEN,
    (PeerState.R_OPEN, "rcv-DWA"): PeerState.R_OPEN,
    (PeerState.R_OPEN, "rcv-CER-ok"): PeerState.R_OPEN,
    (PeerState.R_OPEN, "rcv-CER-bad"): PeerState.R_OPEN,
    (PeerState.R_OPEN, "stop"): PeerState.CLOSING,
    (PeerState.R_OPEN, "rcv-DPR"): PeerState.DONE,
    (PeerState.R_OPEN, "watchdog-down"): PeerState.DONE,
    (PeerState.CLOSING, "rcv-message"): PeerState.CLOSING,
    (PeerState.CLOSING, "rcv-DWR"): PeerState.CLOSING,
    (PeerState.CLOSING, "rcv-DWA"): PeerState.CLOSING,
    (PeerState.CLOSING, "rcv-CER-ok"): PeerState.CLOSING,
    (PeerState.CLOSING, "rcv-CER-bad"): PeerState.CLOSING,
    (PeerState.CLOSING, "rcv-DPA"): PeerState.DONE,
    (PeerState.CLOSING, "rcv-DPR"): PeerState.DONE,
    (PeerState.CLOSING, "timeout"): PeerState.DONE,
    **{(state, event): PeerState.DONE
       for state in (PeerState.CLOSED, PeerState.R_OPEN, PeerState.CLOSING)
       for event in ("peer-disc", "framing-error")},
}

# RFC 3539 3.4.1, as a table (event -> action, next state); "pending" is the DWR-outstanding flag:
#   OKAY     any message     SetWatchdog                                  OKAY
#   OKAY     timer, !pending SendWatchdog, SetWatchdog, pending=true      OKAY
#   OKAY     timer, pending  Failover, SetWatchdog                        SUSPECT
#   SUSPECT  DWA or message  pending=false, Failback, SetWatchdog         OKAY
#   SUSPECT  timer           CloseConnection                              DOWN
WATCHDOG: dict[tuple[Watchdog, str], tuple[str, Watchdog]] = {
    (Watchdog.OKAY, "message"): ("reset", Watchdog.OKAY),
    (Watchdog.OKAY, "timer-idle"): ("send-DWR", Watchdog.OKAY),
    (Watchdog.OKAY, "timer-pending"): ("failover", Watchdog.SUSPECT),
    (Watchdog.SUSPECT, "message"): ("failback", Watchdog.OKAY),
    (Watchdog.SUSPECT, "timer-idle"): ("close", Watchdog.DOWN),
    (Watchdog.SUSPECT, "timer-pending"): ("close", Watchdog.DOWN),
}


class Connection:
    """One transport connection from a peer (MME, SGSN, DRA)."""

    def __init__(self, config: PeerConfig, dictionary: Dictionary, now: float,
                 peer_address: str | None = None, rng: random.Random | None = None,
                 tls_identities: tuple[str, ...] | None = None, tls: bool = False) -> None:
        self.config = config
        # TLS came before the CER (RFC 6733 13.1): a legacy Inband-Security-Id TLS then asks
        # for nothing more
        self.tls = tls
        # The DNS names of the peer's TLS certificate when its Origin-Host must be one of them
        # (None: not checked); lower case.
        self.tls_identities = tls_identities
        self.dictionary = dictionary
        self.peer_address = peer_address
        self.state = PeerState.CLOSED
        self.watchdog = Watchdog.INITIAL
        self.origin_host = ""
        self.origin_realm = ""
        self._framer = Framer(config.max_message_length)
        # AVPs an error answer adds for a DOIC peer (RFC 7683: every answer carries them); the
        # shell points this at the current overload report.
        self.doic: Callable[[], bytes] = _no_doic
        # Overload shedding, set by the shell: `gate()` False refuses an application request
        # with `refuse(raw)` (3004 from the raw bytes); `shed` counts them for the shell.
        # `refuse_run(msgs, start, stop, out, counted)` answers the run of application
        # requests from msgs[start] (before `stop`) with 3004, appends the answers to `out`,
        # and returns where the run ended; `counted` of them (0 or 1: msgs[start]) the gate
        # already counted as refused. `quota()`: how many more requests the gate admits now;
        # -1: no limit (not shedding).
        self.gate: Callable[[], bool] | None = None
        self.refuse_run: Callable[[list[bytes], int, int, list[bytes], int], int] = _no_refuse
        self.quota: Callable[[], int] = _no_quota
        self.shed = 0
        self._pending: list[bytes] = []
        self.max_messages = MAX_MESSAGES_PER_CALL
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._rng = rng or random.Random()
        self._deadline: float | None = now + config.cer_timeout
        self._dwr_pending = False
        self._lost = False  # the transport is gone: nothing more can be sent
        self._final = b""  # the DPA, sent after every earlier answer
        self._next_id = self._rng.getrandbits(32)
        me = config.identity
        self._realm = me.origin_realm.lower()
        self._host = me.origin_host.lower()
        self._osi = u32_avp(ORIGIN_STATE_ID, me.origin_state_id)
        self._capabilities = b"".join(
            [avp(HOST_IP_ADDRESS, address_payload(a)) for a in config.host_ip_addresses]
            + [u32_avp(VENDOR_ID, config.vendor_id),
               str_avp(PRODUCT_NAME, config.product_name, mandatory=False),
               self._osi]
            + [u32_avp(SUPPORTED_VENDOR_ID, v)
               for v in sorted({v for v, _ in config.applications if v})]
            + [self._app_avp(v, a) for v, a in config.applications]
            + [u32_avp(FIRMWARE_REVISION, config.firmware_revision, mandatory=False)]
        )
        self._app_ids = frozenset(a for _, a in config.applications)
        self._last_rx = now
        self._armed_from = now
        self._realm_b = self._realm.encode()
        self._host_b = self._host.encode()
        self._compiled = dictionary.compiled
        self._fast = self._compiled.fast_commands(self._app_ids)

    @staticmethod
    def _app_avp(vendor: int, app: int) -> bytes:
        if vendor:
            return grouped_avp(VENDOR_SPECIFIC_APPLICATION_ID,
                               [u32_avp(VENDOR_ID, vendor), u32_avp(AUTH_APPLICATION_ID, app)])
        return u32_avp(AUTH_APPLICATION_ID, app)

    # -- the three calls ----------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Frame and handle what arrived. At most `max_messages` messages are handled per
        call; the rest wait in `pending` for the next call (with or without new bytes), so one
        peer's burst cannot hold the shell's loop while other peers wait."""
        state = self.state  # a local: `_handle` changes self.state
        if state is PeerState.DONE:
            return
        framer = self._framer
        msgs = framer.feed(data) if data else []
        if self._pending:
            msgs = self._pending + msgs
            self._pending = []
        # An application request (R bit, not the base application) the overload gate turns
        # away is answered from the raw bytes, before anything else is decoded, in this loop:
        # a refusal's cost bounds how much of a storm still gets verdicts. Once the gate said
        # no, it says no to the source until the next overload tick, so the run of application
        # requests that follows is refused in one go (`refuse_run`); a refusal costs a small
        # fraction of a check, so up to REFUSALS_PER_CHECK of them count as one message.
        # The source's admissions go to the youngest requests this call looks at, not the
        # oldest: the first of a read waited in the kernel since the read before (a loop turn
        # of a busy worker, tens of ms under a CPU quota), the last arrived just before it.
        # So while the quota is short of what this call looks at, the head is refused first
        # (`head` requests) and the quota admits the tail: a verdict then waits about the
        # time it takes to handle one read, and refusals, which cost the MME nothing but a
        # retry elsewhere, take the age of the backlog.
        gate = self.gate
        shed = self.shed
        n = len(msgs)
        i = 0
        work = 0
        limit = self.max_messages * REFUSALS_PER_CHECK
        head = 0
        if gate is not None and n and state is PeerState.R_OPEN:
            q = self.quota()
            if q >= 0:
                head = min(n, limit - (REFUSALS_PER_CHECK - 1) * q) - q
        while i < n and work < limit:
            raw = msgs[i]
            if gate is not None and raw[4] & 0x80 and not raw.startswith(BASE_APP, 8) and \
                    self.state is PeerState.R_OPEN:
                if head > 0:
                    stop = self.refuse_run(msgs, i, min(n, i + head, i + limit - work),
                                           self._out, 0)
                    head -= stop - i
                elif not gate():
                    stop = self.refuse_run(msgs, i, min(n, i + limit - work), self._out, 1)
                else:
                    stop = i
                if stop > i:
                    work += stop - i
                    self.shed += stop - i
                    i = stop
                    continue
            i += 1
            work += REFUSALS_PER_CHECK
            self._handle(raw, now)
            if self.state is PeerState.DONE:
                return
        if i < n:
            self._pending = msgs[i:]
        if self.shed != shed:  # refused requests are traffic all the same (RFC 3539)
            if self.watchdog is Watchdog.OKAY:
                self._last_rx = now
            else:
                self._watchdog_event("message", now)
        if framer.error is not None and not self._pending:
            self._transition("framing-error")
            self._close(f"framing error: {framer.error}", peer_caused=True)

    @property
    def pending(self) -> int:
        """Messages framed but not yet handled (see `receive_data`)."""
        return len(self._pending)

    def events(self) -> list[Event]:
        ev = self._events
        self._events = []
        return ev

    def data_to_send(self, final: bool = True) -> bytes:
        """Bytes for the socket. A DPA we owe is held back (`final=False`) while the shell still
        has answers to requests that came before the DPR: the peer closes on DPA."""
        if final and self._final:
            self._out.append(self._final)
            self._final = b""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out = []
        return out

    # -- timers -------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._deadline

    def handle_timer(self, now: float) -> None:
        if self._deadline is None or now < self._deadline:
            return
        if self.state is PeerState.CLOSED:
            self._transition("timeout")
            self._close("no CER within the capabilities-exchange timeout", peer_caused=True)
        elif self.state is PeerState.CLOSING:
            self._transition("timeout")
            self._close("no DPA before the deadline")
        elif self.state is PeerState.R_OPEN:
            # Traffic in OKAY only notes its time (no timer work per message); the timer re-arms
            # from the last message, which is RFC 3539's SetWatchdog on every receipt.
            if self.watchdog is Watchdog.OKAY and self._last_rx > self._armed_from:
                self._set_watchdog(self._last_rx)
                if self._deadline is not None and self._deadline > now:
                    return
            self._watchdog_event("timer-pending" if self._dwr_pending else "timer-idle", now)

    # -- commands from the shell --------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue an answer produced by the application. Still accepted after a DPR/DPA or a
        close decision (state DONE): answers to requests received before it are flushed before
        the transport closes; only a lost transport drops them."""
        if not self._lost:
            self._out.append(data)

    def disconnect(self, now: float, cause: int = REBOOTING) -> None:
        """Start an orderly shutdown: send DPR, then wait for DPA (or the deadline)."""
        if self.state is PeerState.R_OPEN:
            self._transition("stop")
            me = self.config.identity
            self._out.append(message(FLAG_R, DPR, BASE_APPLICATION, self._new_id(),
                                     self._new_id(),
                                     [me.host_origin, u32_avp(DISCONNECT_CAUSE, cause)]))
            self._deadline = now + self.config.dpa_timeout
        elif self.state is PeerState.CLOSED:
            self._transition("stop")
            self._close("shutting down")

    def connection_lost(self) -> None:
        self._lost = True
        if self.state is not PeerState.DONE:
            self._transition("peer-disc")
            self._deadline = None

    # -- internals ----------------------------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        return self._next_id

    def _transition(self, event: str) -> None:
        self.state = TRANSITIONS[(self.state, event)]

    def _close(self, reason: str, peer_caused: bool = False) -> None:
        """After a transition to DONE: no more timers; the shell closes once it has flushed."""
        self._deadline = None
        self._events.append(Closed(reason, peer_caused))

    def _set_watchdog(self, now: float) -> None:
        cfg = self.config
        self._armed_from = now
        self._deadline = now + cfg.watchdog_interval + self._rng.uniform(
            -cfg.watchdog_jitter, cfg.watchdog_jitter)

    def _watchdog_event(self, event: str, now: float) -> None:
        old = self.watchdog
        action, nxt = WATCHDOG[(old, event)]
        self.watchdog = nxt
        if action == "reset":
            self._last_rx = now
            return
        if action == "send-DWR":
            me = self.config.identity
            self._out.append(message(FLAG_R, DWR, BASE_APPLICATION, self._new_id(),
                                     self._new_id(), [me.host_origin, self._osi]))
            self._dwr_pending = True
            self._set_watchdog(now)
        elif action == "failover":
            self._set_watchdog(now)
        elif action == "failback":
            self._dwr_pending = False
            self._set_watchdog(now)
        elif action == "close":
            self._transition("watchdog-down")
            self._events.append(WatchdogChanged(old.value, nxt.value))
            self._close("watchdog: no answer to DWR within 2 Tw")
            return
        if nxt is not old:
            self._events.append(WatchdogChanged(old.value, nxt.value))

    def _handle(self, raw: bytes, now: float) -> None:
        if self.state is PeerState.R_OPEN:
            if self._fast_request(raw, now):
                return
        msg = decode(raw, self.dictionary)
        state = self.state  # a local: the handlers below change self.state
        if state is PeerState.R_OPEN or state is PeerState.CLOSING:
            # In Closing the DPA deadline is the only timer; the watchdog rests.
            if state is PeerState.R_OPEN and self.watchdog is not Watchdog.INITIAL:
                self._watchdog_event("message", now)
            if msg.flags & FLAG_R:
                if msg.code == DWR and msg.application_id == BASE_APPLICATION:
                    self._transition("rcv-DWR")
                    self._base_request(msg, self._dwa_body)
                elif msg.code == DPR and msg.application_id == BASE_APPLICATION:
                    self._on_dpr(msg)
                elif msg.code == CER and msg.application_id == BASE_APPLICATION:
                    self._on_cer(msg)
                else:
                    self._transition("rcv-message")
                    self._app_request(msg)
            else:
                self._on_answer(msg)
            return
        # Closed: the first message must be a CER.
        if msg.code == CER and msg.application_id == BASE_APPLICATION and msg.flags & FLAG_R:
            self._on_cer(msg)
            if self.state is PeerState.R_OPEN:
                self.watchdog = Watchdog.OKAY
                self._set_watchdog(now)
            return
        self._transition("rcv-other")
        if msg.flags & FLAG_R:
            problem = Problem(errors.UNKNOWN_PEER, None, "capabilities exchange (CER) required")
            self._out.append(error_answer(msg, problem, self.config.identity))
            self._events.append(ErrorAnswered(errors.UNKNOWN_PEER, msg.code, msg.hop_by_hop,
                                              problem.message))
        self._close("message before CER", peer_caused=True)

    # -- base protocol ------------------------------------------------------------------------

    def _base_problem(self, msg: Message) -> Problem | None:
        """Grammar and header-bit problems of a base-protocol request."""
        if msg.problems:
            return msg.problems[0]
        if msg.flags & (FLAG_P | FLAG_E):
            return Problem(errors.INVALID_HDR_BITS, None,
                           "P or E bit set on a base protocol request")
        tables = self._compiled.request(BASE_APPLICATION, msg.code)
        if tables is not None:
            validate(msg, tables)
        return msg.problems[0] if msg.problems else None

    def _base_request(self, msg: Message, body: Callable[[], bytes]) -> None:
        problem = self._base_problem(msg)
        if problem is not None:
            self._answer_error(msg, problem)
        else:
            self._out.append(frame(msg, body()))

    def _dwa_body(self) -> bytes:
        return u32_avp(RESULT_CODE, errors.SUCCESS) + self.config.identity.host_origin + self._osi

    def _answer_error(self, msg: Message, problem: Problem, extra: bytes = b"") -> None:
        trailer = b""
        if msg.application_id != BASE_APPLICATION and \
                msg.find(OC_SUPPORTED_FEATURES) is not None:
            trailer = self.doic()
        self._out.append(error_answer(msg, problem, self.config.identity, extra, trailer))
        self._events.append(ErrorAnswered(problem.result_code, msg.code, msg.hop_by_hop,
                                          problem.message))

    def _on_cer(self, msg: Message) -> None:
        problem = self._base_problem(msg)
        host = ""
        a = msg.find(ORIGIN_HOST)
        if a is not None:
            host = msg.text(a)
        if problem is None:
            if not self.config.address_allowed(self.peer_address) or \
                    not self.config.host_allowed(host):
                problem = Problem(errors.UNKNOWN_PEER, None, "peer not in the allow-list")
            elif self.tls_identities is not None and \
                    not identity_matches(host, self.tls_identities):
                problem = Problem(errors.UNKNOWN_PEER, None,
                                  "Origin-Host is not a name of the peer's TLS certificate")
            else:
                common = self._common_applications(msg)
                if not common:
                    problem = Problem(errors.NO_COMMON_APPLICATION, None,
                                      "no common application (S13 16777252 or Relay)")
                elif not self.tls and not _offers_no_inband_security(msg):
                    # RFC 6733 6.10, 7.1.5, 13: the peer asks for in-band TLS after CEA (RFC 3588
                    # style); we only do TLS before CER (--diameter-tls-listen).
                    problem = Problem(errors.NO_COMMON_SECURITY, None,
                                      "no common security (in-band TLS is not supported)")
        if problem is not None:
            self._transition("rcv-CER-bad")
            self._cea_error(msg, problem)
            self._events.append(CerRejected(problem.result_code, problem.message, host))
            if self.state is PeerState.DONE:
                self._close(f"CER rejected with {problem.result_code}", peer_caused=True)
            return
        was_open = self.state is not PeerState.CLOSED
        self._transition("rcv-CER-ok")
        self.origin_host = host
        realm = msg.find(ORIGIN_REALM)
        self.origin_realm = msg.text(realm) if realm is not None else ""
        body = (u32_avp(RESULT_CODE, errors.SUCCESS) + self.config.identity.host_origin
                + self._capabilities)
        self._out.append(frame(msg, body))
        if not was_open:
            self._events.append(PeerOpened(host, self.origin_realm, tuple(sorted(common))))

    def _cea_error(self, msg: Message, problem: Problem) -> None:
        # A failed CEA still carries the capability AVPs its grammar requires (RFC 6733 5.3.2).
        me = self.config.identity
        parts = [u32_avp(RESULT_CODE, problem.result_code), me.host_origin, self._capabilities]
        if problem.message:
            parts.append(str_avp(281, problem.message, mandatory=False))
        if problem.failed_avp is not None:
            parts.append(avp(279, problem.failed_avp))
        self._out.append(frame(msg, b"".join(parts),
                               error=errors.is_protocol_error(problem.result_code)))

    def _common_applications(self, msg: Message) -> set[int]:
        offered: set[int] = set()
        for a in msg.avps:
            code = a.code
            if a.vendor:
                continue
            if code == AUTH_APPLICATION_ID or code == ACCT_APPLICATION_ID:
                offered.add(msg.u32(a))
            elif code == VENDOR_SPECIFIC_APPLICATION_ID and a.children:
                for c in a.children:
                    if c.code in (AUTH_APPLICATION_ID, ACCT_APPLICATION_ID) and not c.vendor:
                        offered.add(msg.u32(c))
        if RELAY_APPLICATION in offered:
            return set(self._app_ids)
        return offered & self._app_ids

    def _on_dpr(self, msg: Message) -> None:
        problem = self._base_problem(msg)
        if problem is not None:
            self._answer_error(msg, problem)
            return
        cause = msg.find(DISCONNECT_CAUSE)
        name = DISCONNECT_CAUSES.get(msg.u32(cause), "?") if cause is not None else "?"
        self._transition("rcv-DPR")
        self._final = frame(msg, u32_avp(RESULT_CODE, errors.SUCCESS)
                            + self.config.identity.host_origin)
        self._events.append(DisconnectRequested(name))
        self._close(f"peer sent DPR ({name})")

    def _on_answer(self, msg: Message) -> None:
        if msg.application_id != BASE_APPLICATION:
            return  # we send no application requests; a stray answer is discarded (RFC 6733 6.2)
        if msg.code == DWR:
            self._transition("rcv-DWA")
            self._dwr_pending = False
        elif msg.code == DPR and self.state is PeerState.CLOSING:
            self._transition("rcv-DPA")
            self._close("DPA received")

    # -- application requests -----------------------------------------------------------------

    def _fast_request(self, raw: bytes, now: float) -> bool:
        """Route on the header first ((application, command, R bit) pick the fast grammar
        before any AVP is decoded), then validate-or-bail in one pass. True when the request
        was plainly valid and is now an AppRequest event; False sends it down the general
        path, which also produces every diagnosis."""
        # Declared ints: the struct's values are Any to mypyc, and every operation on them
        # below would be a generic call.
        vl: int
        fc: int
        app: int
        hbh: int
        e2e: int
        vl, fc, app, hbh, e2e = HEADER.unpack_from(raw, 0)
        flags = fc >> 24
        # R set; E and reserved clear; version 1, length % 4 == 0
        if flags & 0xAF != 0x80 or vl & 0xFF000003 != 0x01000000:
            return False
        code = fc & 0xFFFFFF
        entry = self._fast.get((app << 24) | code)
        if entry is None:
            return False
        fg, pxy, realm_slot, host_slot, layouts = entry
        if flags & FLAG_P and not pxy:
            return False
        length = vl & 0xFFFFFF
        layout = layouts.find(raw, length)
        slots: Slots
        if layout is not None:
            avps = layout.avps
            slots = layout.slots
        else:
            fresh: list[Avp | None] = [None] * fg.nslots
            found = decode_fast(raw, fg, 20, length, fresh)
            if found is None:
                return False
            avps, slots = found, fresh
            layouts.learn(raw, length, avps, slots)
        if realm_slot >= 0:
            a = slots[realm_slot]
            if a is not None and raw[a[VSTART]:a[VEND]].lower() != self._realm_b:
                return False
        if host_slot >= 0:
            a = slots[host_slot]
            if a is not None and raw[a[VSTART]:a[VEND]].lower() != self._host_b:
                return False
        if self.watchdog is Watchdog.OKAY:
            self._last_rx = now
        else:
            self._watchdog_event("message", now)
        self._events.append(AppRequest(Message(flags, code, app, hbh, e2e, raw, avps, [],
                                               slots)))
        return True

    def _app_request(self, msg: Message) -> None:
        app = msg.application_id
        if app == BASE_APPLICATION:
            self._answer_error(msg, Problem(errors.COMMAND_UNSUPPORTED, None,
                                            f"base command {msg.code} not supported"))
            return
        if app not in self._app_ids:
            self._answer_error(msg, Problem(errors.APPLICATION_UNSUPPORTED, None,
                                            f"application {app} not supported"))
            return
        cmd = self.dictionary.command(app, msg.code)
        if cmd is None or cmd.request is None:
            self._answer_error(msg, Problem(errors.COMMAND_UNSUPPORTED, None,
                                            f"command {msg.code} not supported"))
            return
        extra = _answer_extra(cmd.answer)
        if msg.problems:
            self._answer_error(msg, msg.problems[0], extra)
            return
        if msg.flags & FLAG_E or ("PXY" not in cmd.request.flags and msg.flags & FLAG_P):
            self._answer_error(msg, Problem(errors.INVALID_HDR_BITS, None,
                                            "header bits inconsistent with the command"), extra)
            return
        tables = self._compiled.request(app, msg.code)
        assert tables is not None  # compiled from the same command
        validate(msg, tables)
        if msg.problems:
            self._answer_error(msg, msg.problems[0], extra)
            return
        # Routing (RFC 6733 6.1.4): we are a server, not an agent. A request whose
        # Destination-Host is this node is ours whatever its Destination-Realm; without a
        # Destination-Host, its Destination-Realm must be ours.
        a = msg.find(DESTINATION_HOST)
        if a is not None:
            if msg.text(a).lower() != self._host:
                self._answer_error(msg, Problem(errors.UNABLE_TO_DELIVER, None,
                                                f"host {msg.text(a)!r} is not this node"))
                return
        else:
            a = msg.find(DESTINATION_REALM)
            if a is not None and msg.text(a).lower() != self._realm:
                self._answer_error(msg, Problem(errors.REALM_NOT_SERVED, None,
                                                f"realm {msg.text(a)!r} not served"))
                return
        self._events.append(AppRequest(msg))


def _no_doic() -> bytes:
    return b""


def _offers_no_inband_security(msg: Message) -> bool:
    """RFC 6733 6.10: an absent Inband-Security-Id means NO_INBAND_SECURITY (0), the only value
    we support."""
    offered = [msg.u32(a) for a in msg.avps if a.code == INBAND_SECURITY_ID and not a.vendor]
    return not offered or NO_INBAND_SECURITY in offered


def _no_refuse(msgs: list[bytes], start: int, stop: int, out: list[bytes], counted: int) -> int:
    raise AssertionError("a gate without a refuse_run()")


def _no_quota() -> int:
    return -1


def identity_matches(host: str, names: tuple[str, ...]) -> bool:
    """RFC 6125-style: exact (case-insensitive), or a wildcard in the leftmost label only."""
    host = host.lower()
    for name in names:
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False


def _answer_extra(answer: Grammar | None) -> bytes:
    """AVPs an error answer needs beyond the answer-message ones (the ECA's Auth-Session-State)."""
    if answer is not None and any(r.name == "Auth-Session-State" and r.min for r in answer.rules):
        return u32_avp(AUTH_SESSION_STATE, NO_STATE_MAINTAINED)
    return b""
