"""The one raw SMTP test client: bytes written exactly as given, replies read and checked line by
line (every line well formed, a multi-line reply keeps its code)."""

from __future__ import annotations

import contextlib
import re
import select
import socket
import threading
import time
from types import TracebackType

REPLY_LINE = re.compile(rb"^(\d{3})([ -])[^\r\n]*\r\n\Z")
TIMEOUT = 10.0
QUIET = 0.05  # the server has said all it will about what we sent when it is silent this long


class RawClient:
    """One connection to an SMTP server on loopback. With `background=True` a thread reads all
    the time, so that what the server said before it closed is kept even when a later write of
    ours meets the closed socket (the peer's RST would otherwise discard it); without it (for
    thousands of clients at once) reads happen when a reply is asked for."""

    def __init__(
        self,
        port: int,
        source: str = "127.0.0.1",
        timeout: float = TIMEOUT,
        background: bool = False,
    ) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.received = b""  # everything the server wrote
        self.taken = 0  # how much of it line() has handed out
        self.ended: str | None = None  # "eof" or "reset" once the server has gone
        self.changed = threading.Condition()
        self.reader: threading.Thread | None = None
        if background:
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.reader is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.reader.join(self.timeout)
        self.sock.close()

    # --- reading ----------------------------------------------------------------------------

    def _read(self) -> None:
        while self._receive():
            pass

    def _receive(self) -> bool:
        """One recv(2) into received; False once the server has gone."""
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            if self.reader is None:
                raise
            return self.ended is None  # the thread waits on: the test bounds its own waits
        except OSError:  # reset, or our own shutdown at close()
            chunk, ended = b"", "reset"
        else:
            ended = "eof"
        with self.changed:
            self.received += chunk
            if not chunk:
                self.ended = self.ended or ended
            self.changed.notify_all()
        return bool(chunk)

    def _more(self, seconds: float) -> bool:
        """Wait up to seconds for more bytes; False when the server has gone or was silent."""
        if self.reader is None:
            return self._receive()
        with self.changed:
            size = len(self.received)
            self.changed.wait_for(lambda: len(self.received) > size or self.ended, seconds)
            return len(self.received) > size

    def line(self) -> bytes:
        """The next line the server wrote, with its line end; b"" at the end of the stream."""
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self.received[self.taken :]:
            if not self._more(self.timeout) and (self.ended or time.monotonic() > deadline):
                if self.ended is None:
                    raise TimeoutError(f"no line within {self.timeout} s")
                rest, self.taken = self.received[self.taken :], len(self.received)
                return rest
        end = self.received.index(b"\n", self.taken) + 1
        line, self.taken = self.received[self.taken : end], end
        return line

    def reply(self) -> bytes:
        """One whole reply: its last line without CRLF. Every line must match `^\\d{3}[ -]` and
        end in CRLF, and the lines of a multi-line reply share one code."""
        code = None
        while True:
            line = self.line()
            match = REPLY_LINE.match(line)
            assert match, f"not a well-formed reply line: {line!r}"
            assert code in (None, match[1]), f"multi-line reply changed its code: {line!r}"
            code = match[1]
            if match[2] == b" ":
                return line[:-2]

    def lines_of_reply(self) -> list[bytes]:
        """Every line of the next reply, as written."""
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return lines

    def silent(self, seconds: float) -> bool:
        """True if the server writes nothing (and does not close) for this long."""
        if self.received[self.taken :] or self.ended:
            return False
        if self.reader is not None:
            return not self._more(seconds) and not self.ended
        readable, _, _ = select.select([self.sock], [], [], seconds)
        return not readable

    def expect_closed(self) -> None:
        """The server has closed the connection and has nothing more to say."""
        rest = self.line()
        assert rest == b"", f"expected the connection closed, got {rest!r}"

    # --- writing ----------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def ask(self, *lines: bytes) -> list[bytes]:
        """Send lines in one write (pipelined); one reply per line."""
        self.send(b"".join(lines))
        return [self.reply() for _ in lines]

    def write(self, chunk: bytes) -> None:
        """Send what a fuzzer made; once the server has gone, nothing (background mode)."""
        if self.ended is not None:
            return
        try:
            self.sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            with self.changed:
                self.changed.wait_for(lambda: self.ended is not None, self.timeout)

    # --- a whole conversation (background mode) ----------------------------------------------

    def read_until_quiet(self) -> None:
        """Wait until the server is silent for QUIET, or has gone."""
        deadline = time.monotonic() + self.timeout
        while self.ended is None and self._more(QUIET):
            assert time.monotonic() < deadline, f"never silent: {self.received[-300:]!r}"

    def replies(self) -> list[bytes]:
        """The final line of each reply read so far; every line must be well formed."""
        with self.changed:
            received, ended = self.received, self.ended
        lines = received.split(b"\r\n")
        tail = lines.pop()
        assert tail == b"" or ended == "reset", f"a reply without CRLF: {tail!r}"
        finals, code = [], None
        for line in lines:
            match = REPLY_LINE.match(line + b"\r\n")
            assert match, f"not a well-formed reply line: {line!r}"
            assert code in (None, match[1]), f"multi-line reply changed its code: {line!r}"
            code = match[1]
            if match[2] == b" ":
                finals.append(line)
                code = None
        assert code is None or ended == "reset", "a multi-line reply was never finished"
        return finals

    def finish(self) -> None:
        """End an open DATA, then QUIT; the server must close the connection. After each QUIT
        the server is given its whole timeout to close: on a busy machine it can fall silent
        for longer than QUIET while it still works through what came before."""
        for _ in range(3):
            self.read_until_quiet()
            if self.ended is not None:
                return
            replies = self.replies()
            in_data = bool(replies) and replies[-1].startswith(b"354 ")
            self.write(b"\r\n.\r\nQUIT\r\n" if in_data else b"\r\nQUIT\r\n")
            with self.changed:  # unless DATA opened meanwhile and took the QUIT as content
                if self.changed.wait_for(lambda: self.ended is not None, self.timeout / 3):
                    return
        raise AssertionError(f"QUIT did not end the session: {self.received[-300:]!r}")
