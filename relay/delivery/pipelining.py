"""Delivery, command pipelining: on an aiosmtplib session, a group of commands goes out in one
write and their replies are read back in order (RFC 2920)."""

from __future__ import annotations

from aiosmtplib import SMTP, SMTPResponse, SMTPServerDisconnected
from aiosmtplib.protocol import SMTPProtocol


class Group(SMTPProtocol):
    """aiosmtplib's protocol (5.x), keeping the bytes that arrive while a parsed reply still
    waits to be read, as long as more replies of a group are due. The base class drops them:
    without pipelining they could only be unsolicited, and so it does once the group is read."""

    due = 0  # replies of the group not yet asked for (the one awaited is not counted)

    def data_received(self, data: bytes) -> None:
        waiter = self._response_waiter
        if self.due > 0 and waiter is not None and waiter.done():
            self._buffer.extend(data)  # a later reply of the group, parsed when it is read
            return
        super().data_received(data)


def offered(smtp: SMTP) -> bool:
    """Whether the server announced PIPELINING in its EHLO reply."""
    return smtp.supports_extension("pipelining")


def send(smtp: SMTP, commands: list[bytes]) -> Group:
    """Write every command (without its CRLF) at once; read their replies with reply()."""
    protocol = smtp.protocol
    if protocol is None or not protocol.is_connected:
        raise SMTPServerDisconnected("Connection lost")
    if not isinstance(protocol, Group):
        protocol.__class__ = Group  # same object and state, one method more
    assert isinstance(protocol, Group)
    protocol.due = len(commands)
    protocol.write(b"".join(command + b"\r\n" for command in commands))
    return protocol


async def reply(protocol: Group, timeout: float) -> SMTPResponse:
    """The next reply of the group sent: from what already arrived, else awaited. Replies that
    arrived before the server closed the connection are still read; then it raises."""
    protocol.due -= 1
    buffered = protocol._read_response_from_buffer() if protocol._buffer else None
    if buffered is not None:
        return buffered
    return await protocol.read_response(timeout=timeout)
