"""Server-Sent Events for tests: a client of GET /v1/events reading its frames in a thread, as
an application would (each frame's id, event and JSON data; comments counted)."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Frame:
    event: str | None = None
    id: str | None = None
    data: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads("\n".join(self.data))


class Stream:
    """One open GET /v1/events (url: the API's http://host:port), its frames kept in arrival
    order; close() ends it from our side."""

    def __init__(
        self, url: str | None, token: str, query: str = "", headers: dict[str, str] | None = None
    ) -> None:
        assert url, "turn the API on: relay(api_on())"
        parts = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        self.conn.request(
            "GET", f"/v1/events{'?' + query if query else ''}",
            headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream",
                     **(headers or {})},
        )  # fmt: skip
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = dict(self.response.headers)
        self.frames: list[Frame] = []
        self.comments: list[str] = []
        self.ended = threading.Event()
        self.lock = threading.Lock()
        if self.status == 200:
            threading.Thread(target=self._read, daemon=True).start()
        else:
            self.body = json.loads(self.response.read() or b"null")
            self.conn.close()
            self.ended.set()

    def _read(self) -> None:
        frame = Frame()
        try:
            for raw in self.response:
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if frame.data or frame.event:
                        with self.lock:
                            self.frames.append(frame)
                    frame = Frame()
                elif line.startswith(":"):
                    self.comments.append(line[1:].strip())
                else:
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if name == "data":
                        frame.data.append(value)
                    elif name in ("id", "event"):
                        setattr(frame, name, value)
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            pass  # closed by us or by the relay
        finally:
            self.ended.set()

    def events(self) -> list[Frame]:
        """The message.* frames so far."""
        with self.lock:
            return [f for f in self.frames if (f.event or "").startswith("message.")]

    def wait(self, done: Callable[[list[Frame]], bool], timeout: float) -> list[Frame]:
        """The frames once done(frames) holds; AssertionError after timeout seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frames = self.events()
            if done(frames):
                return frames
            time.sleep(0.05)
        raise AssertionError(f"stream: {len(self.events())} frames after {timeout}s")

    def close(self) -> None:
        sock = self.conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        self.ended.wait(5)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def stalled(url: str, token: str, query: str = "") -> socket.socket:
    """A client that asks for the stream and never reads it, with a 4 KiB receive buffer."""
    parts = urllib.parse.urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parts.hostname or "127.0.0.1", parts.port or 80))
    path = f"/v1/events{'?' + query if query else ''}"
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {token}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    return sock
