"""Intake, the DATA reader: the mail data read as it arrives, checked on the stream (size,
line length, bare CR or LF, NUL) and dot-unstuffed into a Draft that keeps the header block in
memory and spills the body into the spool beyond MEMORY_LIMIT, so that a session in DATA costs
a bounded amount of memory whatever the size of its message."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from relay.spool.spill import Spill

# The end of the mail data (RFC 5321 §4.1.1.4): a line holding one dot. Searched for as
# ".\r\n" so that the dot line right at the start of the data is found too.
DOT_LINE = b".\r\n"
DATA_END = b"\r\n.\r\n"
REPLY_DATA_LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
REPLY_DATA_TOO_BIG = "552 Error: Too much mail data"
HEADER_END = b"\r\n\r\n"
# The header block is kept in memory (directives, the From: check and DKIM read it) up to this
# size; a longer one is cut at a line end there and the rest travels as body.
HEAD_LIMIT = 256 * 1024
# Body bytes held in memory: a smaller body is written once, at the group commit; a larger one
# goes to its spill file in writes of this size, in a worker thread.
MEMORY_LIMIT = 128 * 1024


class Draft:
    """A message's content while it arrives and until it is stored: the header block (through
    its empty line) in memory, the body in memory up to MEMORY_LIMIT and beyond that in a spill
    file of the spool. discard() must follow, whatever happens."""

    def __init__(self, open_spill: Callable[[], Spill]) -> None:
        self._open_spill = open_spill
        self._head = bytearray()
        self.head_done = False  # no more bytes go to the head
        self.head_complete = False  # the head ends with the empty line of RFC 5322 §2.1
        self._body = bytearray()
        self.spill: Spill | None = None
        self.body_size = 0
        self.error: OSError | None = None  # the spill could not be written (disk full, …)
        self.bare_line_end = False  # found by the reader (RFC 5321 §2.3.8)
        self.nul = False

    @property
    def head(self) -> bytes:
        return bytes(self._head)

    @property
    def whole_head(self) -> bool:
        """Whether head holds every header field: it ended with its empty line, or the message
        is all header (no body)."""
        return self.head_complete or self.body_size == 0

    @property
    def parts(self) -> list[bytes | Spill]:
        """The body in order: the spill file (if any), then what is still in memory."""
        tail: list[bytes | Spill] = [bytes(self._body)] if self._body else []
        return tail if self.spill is None else [self.spill, *tail]

    async def feed(self, piece: bytes) -> None:
        """Take the next unstuffed piece of the content."""
        if not self.head_done:
            piece = self._take_head(piece)
        if not piece:
            return
        self.body_size += len(piece)
        if self.error is None:
            self._body += piece
            if len(self._body) >= MEMORY_LIMIT:
                await self._flush()

    def discard(self) -> None:
        """Let go of the spill file (it has no name: nothing is left on disk)."""
        spill, self.spill = self.spill, None
        if spill is not None:
            spill.close()

    def _take_head(self, piece: bytes) -> bytes:
        """Add piece to the head until its empty line (or HEAD_LIMIT); what follows."""
        start = max(0, len(self._head) - len(HEADER_END) + 1)
        self._head += piece
        end = self._head.find(HEADER_END, start)
        if end >= 0:
            cut = end + len(HEADER_END)
            self.head_complete = True
        elif len(self._head) > HEAD_LIMIT:
            cut = self._head.rfind(b"\n", 0, HEAD_LIMIT) + 1 or HEAD_LIMIT
        else:
            return b""
        self.head_done = True
        rest = bytes(self._head[cut:])
        del self._head[cut:]
        return rest

    async def _flush(self) -> None:
        """Move the body held in memory to the spill file, in a worker thread
        (docs/architecture.md invariant 5); a failure is kept for the reply after the data,
        and the rest dropped."""
        data, self._body = self._body, bytearray()
        try:
            if self.spill is None:
                self.spill = self._open_spill()
            await asyncio.to_thread(self.spill.write, data)
        except OSError as exc:
            self.error = exc
            self.discard()


class Scan:
    """The checks and the dot-unstuffing of the mail data, block by block as it arrives, with
    what they need to carry from one block to the next."""

    def __init__(self, size_limit: int | None, line_limit: int) -> None:
        self.size_limit = size_limit
        self.line_limit = line_limit
        self.total = 0  # raw bytes, the end mark included
        self.tail = b""  # the last raw bytes, for marks that straddle two blocks
        self.line = 0  # length of the raw line in progress
        self.long_line = False
        self.counts = [0, 0, 0]  # CRLF pairs, LFs, CRs
        self.nul = False

    @property
    def too_big(self) -> bool:
        return bool(self.size_limit) and self.total > (self.size_limit or 0) + len(DOT_LINE)

    @property
    def problem(self) -> str | None:
        """The refusal the data has earned so far (the size first, as aiosmtpd answers)."""
        if self.too_big:
            return REPLY_DATA_TOO_BIG
        return REPLY_DATA_LINE_TOO_LONG if self.long_line else None

    @property
    def bare_line_end(self) -> bool:
        pairs, lfs, crs = self.counts
        return lfs != pairs or crs != pairs

    def take(self, block: bytes) -> tuple[bytes, bool]:
        """The unstuffed content in block, and whether block ends the data."""
        last = self.tail + block[-len(DATA_END) :]  # not a copy of the whole block
        ended = last.endswith(DATA_END) or (self.total == 0 and block == DOT_LINE)
        piece = self._unstuff(block[: -len(DOT_LINE)] if ended else block)
        self._check(block)
        self.total += len(block)
        self.tail = last[-4:]
        return piece, ended

    def _unstuff(self, piece: bytes) -> bytes:
        """RFC 5321 §4.5.2: a line's leading dot was doubled by the client."""
        if self.total == 0 or self.tail.endswith(b"\r\n"):
            piece = piece[1:] if piece.startswith(b".") else piece
        elif self.tail.endswith(b"\r") and piece.startswith(b"\n."):
            piece = b"\n" + piece[2:]
        return piece.replace(b"\r\n.", b"\r\n")

    def _check(self, block: bytes) -> None:
        """Line length (RFC 5321 §4.5.3.1.6, the CRLF counted), CR and LF only in pairs, and NUL,
        each counted at C speed."""
        pairs = block.count(b"\r\n") + (self.tail.endswith(b"\r") and block.startswith(b"\n"))
        for index, count in enumerate((pairs, block.count(b"\n"), block.count(b"\r"))):
            self.counts[index] += count
        self.nul = self.nul or b"\0" in block
        if self.long_line:
            return
        lines = block.split(b"\n")
        longest = max([self.line + len(lines[0]), *map(len, lines[1:])])
        self.line = len(lines[-1]) + (self.line if len(lines) == 1 else 0)
        self.long_line = longest >= self.line_limit


def pieces(parts: list[bytes | Spill]) -> Iterator[bytes]:
    """The bytes of a Draft's parts in order (a spill file read back in blocks), for a worker
    thread."""
    for part in parts:
        if isinstance(part, Spill):
            yield from part.chunks()
        else:
            yield part


async def read_data(
    reader: asyncio.StreamReader,
    draft: Draft,
    size_limit: int | None,
    line_limit: int,
    arrived: Callable[[], None] = lambda: None,
) -> str | None:
    """Read the mail data up to the line holding one dot into draft, dot-unstuffed (RFC 5321
    §4.5.2); a refusal once it has all been read (over size_limit, or a line with its CRLF
    longer than line_limit), else None. Reads up to each ".\r\n" (the reader's limit caps each
    read, and the rest of the data is read in pieces), so nothing after the end of the data is
    consumed; once a limit is passed the rest is read and dropped. arrived() is called after
    each read: the session's idle timer restarts while data keeps coming (RFC 5321 §4.5.3.2
    times the wait for each block, not the whole DATA)."""
    scan = Scan(size_limit, line_limit)
    ended = False
    while not ended:
        try:
            block = await reader.readuntil(DOT_LINE)
        except asyncio.LimitOverrunError as exc:
            block = await reader.read(exc.consumed)
        arrived()
        piece, ended = scan.take(block)
        if scan.problem is None:
            await draft.feed(piece)
    draft.bare_line_end, draft.nul = scan.bare_line_end, scan.nul
    return scan.problem
