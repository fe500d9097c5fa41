"""An HTTP/2 client for tests that must steer flow control and resets by hand: the `h2` library (a full HTTP/2
implementation, not hand-written frames) over a blocking loopback socket. curl, h2load and grpcio cover the
rest; they cannot hold a stream's window shut or send RST_STREAM on cue.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings


@dataclass
class Received:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code, if reset


class H2Peer:
    """`window`: this client's stream window; its connection window is opened wide, so only streams stall.
    Data on a stream in `held` is not acknowledged (its window stays shut) until `release(stream)`."""

    def __init__(self, port: int, window: int = 65535, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window, h2.settings.SettingCodes.ENABLE_PUSH: 0})
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(1 << 30)
        self.streams: dict[int, Received] = {}
        self.held: set[int] = set()
        self.unacked: dict[int, int] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.pings = 0
        self.closed = False
        self._send()

    def _send(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: str, authority: str = "backend", method: str = "GET", body: bytes = b"",
                headers: list[tuple[str, str]] = (), end: bool = True, trailers: list[tuple[str, str]] = ()) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        block = [(":method", method), (":scheme", "http"), (":authority", authority), (":path", path), *headers]
        self.conn.send_headers(stream_id, [(k.encode(), v.encode()) for k, v in block],
                               end_stream=end and not body and not trailers)
        self.streams[stream_id] = Received()
        if body:
            self.send_body(stream_id, body, end=end and not trailers)
        if trailers:
            self.conn.send_headers(stream_id, [(k.encode(), v.encode()) for k, v in trailers], end_stream=True)
        self._send()
        return stream_id

    def send_body(self, stream_id: int, body: bytes, end: bool = False) -> None:
        view = memoryview(body)
        while view:
            window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.read_once()
                continue
            self.conn.send_data(stream_id, bytes(view[:window]), end_stream=end and len(view) <= window)
            view = view[window:]
            self._send()
        if end and not body:
            self.conn.end_stream(stream_id)
            self._send()

    def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id, 8)  # CANCEL
        self._send()

    def ping(self) -> None:
        self.conn.ping(b"12345678")
        self._send()

    def release(self, stream_id: int) -> None:
        self.held.discard(stream_id)
        size = self.unacked.pop(stream_id, 0)
        if size:
            self.conn.acknowledge_received_data(size, stream_id)
            self._send()

    def read_once(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            self.closed = True
            raise ConnectionError("the proxy closed the connection")
        for event in self.conn.receive_data(data):
            stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.ResponseReceived) and stream is not None:
                stream.headers = list(event.headers)
                stream.status = int(dict(stream.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived) and stream is not None:
                stream.body += event.data
                if event.stream_id in self.held:
                    self.unacked[event.stream_id] = self.unacked.get(event.stream_id, 0) + event.flow_controlled_length
                else:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived) and stream is not None:
                stream.trailers = list(event.headers)
            elif isinstance(event, h2.events.StreamEnded) and stream is not None:
                stream.ended = True
            elif isinstance(event, h2.events.StreamReset) and stream is not None:
                stream.reset = event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
                if event.error_code == 0:  # graceful: h2 closes its state machine anyway; streams below go on
                    self.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
            elif isinstance(event, h2.events.PingAckReceived):
                self.pings += 1
        self._send()

    def wait(self, condition, timeout: float = 30.0) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting on the HTTP/2 connection")
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            self.read_once()

    def finished(self, stream_id: int) -> Received:
        stream = self.streams[stream_id]
        self.wait(lambda: stream.ended or stream.reset is not None)
        return stream

    def close(self) -> None:
        self.sock.close()


class H2Server:
    """An HTTP/2 upstream whose misbehaviour the test chooses (h2 on a plain socket, a thread per connection):
    /reset-after-start answers a head and some data, then RST_STREAM INTERNAL_ERROR; /refuse answers RST_STREAM
    REFUSED_STREAM the first time (and 200 `second` after); anything else echoes the request's trailers as JSON."""

    def __init__(self) -> None:
        import threading

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[tuple[str, list[tuple[bytes, bytes]]]] = []  # (path, trailers)
        self.refused = 0
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        import threading

        while self.running:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        import json

        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        paths: dict[int, str] = {}
        trailers: dict[int, list[tuple[bytes, bytes]]] = {}
        with sock:
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        paths[event.stream_id] = dict(event.headers)[b":path"].decode()
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.TrailersReceived):
                        trailers[event.stream_id] = list(event.headers)
                    if isinstance(event, h2.events.StreamEnded | h2.events.TrailersReceived) \
                            and event.stream_id in paths:
                        sid = event.stream_id
                        path = paths.pop(sid)
                        self.requests.append((path, trailers.get(sid, [])))
                        if path == "/reset-after-start":
                            conn.send_headers(sid, [(b":status", b"200")])
                            conn.send_data(sid, b"partial")
                            conn.reset_stream(sid, 2)
                        elif path == "/refuse" and self.refused == 0:
                            self.refused += 1
                            conn.reset_stream(sid, 7)
                        else:
                            body = json.dumps({"path": path, "trailers": [[k.decode(), v.decode()]
                                                                          for k, v in trailers.get(sid, [])]})
                            conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"%d" % len(body))])
                            conn.send_data(sid, body.encode(), end_stream=True)
                sock.sendall(conn.data_to_send())

    def close(self) -> None:
        self.running = False
        self.listener.close()
