"""A small NRF (TS 29.510 Nnrf_NFManagement) test double on the `h2` library: HTTP/2 with prior
knowledge over asyncio, independent of the server stack under test. It keeps NF profiles,
answers NFRegister (PUT, 201 then 200), heart-beat (PATCH 204, 404 for an instance it does not
know) and NFDeregister (DELETE 204), and records every request it received."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events

PREFIX = "/nnrf-nfm/v1/nf-instances/"


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class NrfDouble:
    heartbeat: int = 1  # the heartBeatTimer the NRF imposes in its answer
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None
    port: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self, method: str) -> list[Received]:
        return [r for r in self.received if r.method == method]

    async def start(self, port: int = 0, sock: socket.socket | None = None) -> NrfDouble:
        """`sock`: a socket bound beforehand (refusing connections until now), so that the port
        cannot be taken by another socket, or by a client's own connect to it, in between."""
        if sock is not None:
            self.server = await asyncio.start_server(self._serve, sock=sock)
        else:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def wait_for(self, method: str, count: int = 1, timeout: float = 20.0) -> Received:
        async def until() -> Received:
            while True:
                got = self.requests(method)
                if len(got) >= count:
                    return got[count - 1]
                self.changed.clear()
                await self.changed.wait()

        return await asyncio.wait_for(until(), timeout)

    def _answer(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if not path.startswith(PREFIX):
            return 404, b""
        nf_id = path[len(PREFIX):]
        if method == "PUT":
            profile = json.loads(body)
            if profile.get("nfInstanceId") != nf_id:
                return 400, b'{"status":400,"cause":"MANDATORY_IE_INCORRECT"}'
            created = nf_id not in self.profiles
            profile["heartBeatTimer"] = self.heartbeat
            self.profiles[nf_id] = profile
            return (201 if created else 200), json.dumps(profile).encode()
        if method == "PATCH":
            return (204, b"") if nf_id in self.profiles else (404, b"")
        if method == "DELETE":
            return (204, b"") if self.profiles.pop(nf_id, None) is not None else (404, b"")
        return 405, b""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        heads: dict[int, dict[str, str]] = {}
        bodies: dict[int, bytes] = {}
        try:
            while data := await reader.read(65536):
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        heads[ev.stream_id] = {k.decode(): v.decode() for k, v in ev.headers}
                    elif isinstance(ev, h2.events.DataReceived):
                        bodies[ev.stream_id] = bodies.get(ev.stream_id, b"") + ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        h = heads.pop(ev.stream_id)
                        body = bodies.pop(ev.stream_id, b"")
                        self.received.append(Received(h[":method"], h[":path"], h, body,
                                                      asyncio.get_running_loop().time()))
                        status, out = self._answer(h[":method"], h[":path"], body)
                        rh = [(":status", str(status))]
                        if out:
                            rh.append(("content-type", "application/json"))
                        conn.send_headers(ev.stream_id, rh, end_stream=not out)
                        if out:
                            conn.send_data(ev.stream_id, out, end_stream=True)
                        self.changed.set()
                writer.write(conn.data_to_send())
                await writer.drain()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            writer.close()
