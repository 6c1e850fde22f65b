"""Bounces, the returned content: the header block of a message's content file, or the whole
file for RET=FULL when it is at most bounces.max_returned; read in bounded blocks (blocking:
call from a worker thread)."""

from __future__ import annotations

from pathlib import Path

from relay.bounces.compose import Returned

BLOCK = 64 * 1024
# The intake keeps a header block to 256 KiB and adds Received: and DKIM-Signature: lines;
# beyond this much, what was read is returned as the header block.
HEADERS_MAX = 512 * 1024
END = b"\r\n\r\n"


def read_returned(content: Path, size: int, ret: str | None, max_returned: int) -> Returned:
    """What goes back of the message whose content file is `content` (size bytes)."""
    with content.open("rb") as file:
        if ret == "FULL" and size <= max_returned:
            whole = file.read(max_returned + 1)
            if len(whole) <= max_returned:
                return Returned(_header_block(whole), whole)
            file.seek(0)
        head = b""
        while len(head) < HEADERS_MAX and END not in head:
            block = file.read(BLOCK)
            if not block:
                break
            head += block
    return Returned(_header_block(head))


def _header_block(data: bytes) -> bytes:
    """The header lines through the last one's CRLF (a cut block: through its last CRLF)."""
    end = data.find(END)
    if end >= 0:
        return data[: end + 2]
    cut = data.rfind(b"\r\n")
    return data[: cut + 2] if cut >= 0 else b""
