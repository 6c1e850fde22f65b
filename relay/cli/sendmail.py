"""Command line, sendmail(8): `relay sendmail` (also `relay-sendmail`, to link as
/usr/sbin/sendmail) takes a message on standard input the way cron, PHP's mail(), git
send-email and scripts hand it over, and drops it into the maildrop, where the daemon picks it
up, now or when it next starts (docs/sendmail.md)."""

from __future__ import annotations

import email.utils
import os
import pwd
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from relay import config
from relay.cli.fail import Fail
from relay.mail.dsnparams import ParamError, parse_rcpt_params
from relay.spool import maildrop

if TYPE_CHECKING:
    from relay.cli.stdio_smtp import Envelope as StdioEnvelope

EX_USAGE, EX_DATAERR, EX_UNAVAILABLE, EX_TEMPFAIL = 64, 65, 69, 75  # sysexits(3)
# Flags scripts pass that mean nothing here (delivery mode, error mode, me-too, verbose, ...).
IGNORED = frozenset({"oem", "oee", "oep", "oeq", "oew", "odb", "odi", "odq", "om", "U", "v",
                     "bm", "G", "n", "m", "Am", "Ac"})  # fmt: skip
VALUED = frozenset("frFNVCBRLOX")  # flags with a value, attached (-fme@x) or the next argument
LONE_DOT = re.compile(rb"^\.\r?$", re.MULTILINE)
BARE_LF = re.compile(rb"(?<!\r)\n")
HEADER_END = re.compile(rb"\r\n\r\n")
FIELD = re.compile(rb"^([!-9;-~]+):", re.MULTILINE)  # a header field's name at a line start


@dataclass
class Options:
    """What the command line asked for."""

    recipients: list[str] = field(default_factory=list)
    mode: str = "send"  # send | bs (SMTP on stdin/stdout) | bp (the queue) | q (flush)
    from_headers: bool = False  # -t
    dots: bool = True  # a lone "." ends the message, unless -i / -oi
    sender: str | None = None  # -f / -r
    full_name: str | None = None  # -F
    notify: list[str] | None = None  # -N
    envid: str | None = None  # -V
    ret: str | None = None  # -R
    config: str | None = None  # --config / -C


def parse(argv: list[str]) -> Options:
    """sendmail's flags as Postfix and Exim take them; Fail (64) naming an unknown one."""
    opts = Options()
    args = iter(argv)
    for arg in args:
        if arg == "--":
            opts.recipients += list(args)
        elif arg.startswith("--config"):
            opts.config = arg.partition("=")[2] or next(args, None)
            if not opts.config:
                raise Fail("sendmail: --config needs a file", EX_USAGE)
        elif not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
        else:
            flag(opts, arg[1:], args)
    return opts


def flag(opts: Options, text: str, rest: object) -> None:
    """Apply one flag (without its dash); a valued flag takes the next argument if needed."""
    if text in ("t", "i", "oi", "bs", "bp") or text.startswith("q"):
        _switch(opts, text)
    elif text in IGNORED:
        pass
    elif text[:1] in VALUED:
        value = text[1:] or next(rest, None)  # type: ignore[call-overload]
        if value is None:
            raise Fail(f"sendmail: -{text[:1]} needs a value", EX_USAGE)
        _value(opts, text[:1], value)
    else:
        raise Fail(f"sendmail: unknown flag -{text} (see relay sendmail in the README)", EX_USAGE)


def _switch(opts: Options, text: str) -> None:
    if text == "t":
        opts.from_headers = True
    elif text in ("i", "oi"):
        opts.dots = False
    else:
        opts.mode = "q" if text.startswith("q") else text


def _value(opts: Options, letter: str, value: str) -> None:
    if letter in "fr":
        opts.sender = value.strip().removeprefix("<").removesuffix(">")
    elif letter == "F":
        opts.full_name = value
    elif letter == "N":
        opts.notify = notify(value)
    elif letter == "V":
        if not (0 < len(value) <= 100 and value.isascii() and value.isprintable()):
            raise Fail("sendmail: -V: an envelope id of 1-100 printable ASCII characters", EX_USAGE)
        opts.envid = value
    elif letter == "R":
        if value.upper() not in ("FULL", "HDRS"):
            raise Fail(f"sendmail: -R {value!r}: FULL or HDRS", EX_USAGE)
        opts.ret = value.upper()
    elif letter == "C":
        opts.config = value


def notify(value: str) -> list[str]:
    """-N NEVER or some of SUCCESS,FAILURE,DELAY, as RCPT's NOTIFY (RFC 3461 §4.1)."""
    try:
        return list(parse_rcpt_params([f"NOTIFY={value.upper()}"]).notify or [])
    except ParamError as exc:
        raise Fail(f"sendmail: -N {value!r}: {exc.reply.split(' ', 2)[-1]}", EX_USAGE) from None


# --- the message --------------------------------------------------------------------------------


def message(raw: bytes, dots: bool) -> bytes:
    """stdin's bytes as a message: up to a lone "." unless -i, every line end CRLF."""
    if dots:
        end = LONE_DOT.search(raw)
        raw = raw[: end.start()] if end else raw
    data = BARE_LF.sub(b"\r\n", raw)
    return data if data.endswith(b"\r\n") or not data else data + b"\r\n"


def split(data: bytes) -> tuple[bytes, bytes]:
    """The header block (each field with its CRLF) and the rest (the empty line and body)."""
    if not FIELD.match(data):
        return b"", data if data.startswith(b"\r\n") else b"\r\n" + data
    end = HEADER_END.search(data)
    if end is None:
        return data, b"\r\n"
    return data[: end.start() + 2], data[end.start() + 2 :]


def fields(header: bytes) -> list[tuple[str, bytes]]:
    """The header block as (lower-case name, the field's whole text with continuations)."""
    out: list[tuple[str, bytes]] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + line)
        elif b":" in line:
            out.append((line.split(b":", 1)[0].strip().decode("latin-1").lower(), line))
    return out


def value(text: bytes) -> str:
    """A field's value, unfolded."""
    return " ".join(text.split(b":", 1)[1].decode("utf-8", "replace").split())


def header_recipients(parsed: list[tuple[str, bytes]]) -> list[str]:
    """-t: To, Cc and Bcc, or their Resent- forms when the message has any Resent- field."""
    resent = any(name.startswith("resent-") for name, _ in parsed)
    names = {f"{'resent-' if resent else ''}{n}" for n in ("to", "cc", "bcc")}
    values = [value(text) for name, text in parsed if name in names]
    return [address for _, address in email.utils.getaddresses(values) if address]


@dataclass(frozen=True)
class Prepared:
    sender: str
    recipients: list[str]
    data: bytes


def prepare(opts: Options, raw: bytes, cfg: config.Config, user: str) -> Prepared:
    """The envelope and the message to drop: recipients from the command line (and with -t
    the header), Bcc removed, Date, Message-ID and From added where missing."""
    data = message(raw, opts.dots)
    if not data.strip():
        raise Fail("sendmail: no message on standard input", EX_DATAERR)
    header, body = split(data)
    parsed = fields(header)
    rcpts = opts.recipients + (header_recipients(parsed) if opts.from_headers else [])
    if not rcpts:
        raise Fail("sendmail: no recipients (give them as arguments, or -t)", EX_DATAERR)
    domain = cfg.sendmail.default_domain or cfg.smtp.hostname
    sender = opts.sender if opts.sender is not None else default_sender(cfg, parsed, user, domain)
    sender = qualified(sender, domain) if sender else ""  # -f "" or -f <>: the null sender
    rcpts = [qualified(r, domain) for r in rcpts]
    kept = [text for name, text in parsed if name not in ("bcc", "resent-bcc")]
    names = {name for name, _ in parsed}
    added = missing(names, sender or f"MAILER-DAEMON@{domain}", opts.full_name, domain)
    rcpts = list(dict.fromkeys(rcpts))
    if problem := maildrop.too_many(rcpts, cfg.smtp.max_recipients):
        raise Fail(f"sendmail: {problem}", EX_DATAERR)
    return Prepared(sender, rcpts, b"".join(kept) + added + body)


def qualified(address: str, domain: str) -> str:
    """A bare user name (root, www-data) at domain, as Postfix appends $myorigin."""
    return address if "@" in address else f"{address}@{domain}"


def default_sender(
    cfg: config.Config, parsed: list[tuple[str, bytes]], user: str, domain: str
) -> str:
    """The envelope sender without -f: the From address (sender_from_header), else user@domain."""
    if cfg.sendmail.sender_from_header:
        found = [value(text) for name, text in parsed if name == "from"]
        addresses = [a for _, a in email.utils.getaddresses(found) if a]
        if addresses:
            return addresses[0]
    return f"{user}@{domain}"


def missing(names: set[str], sender: str, full_name: str | None, domain: str) -> bytes:
    """Date, Message-ID and From for a message that lacks them (RFC 5322 §3.6)."""
    out = b""
    if "from" not in names:
        out += f"From: {email.utils.formataddr((full_name or '', sender))}\r\n".encode()
    if "date" not in names:
        out += f"Date: {email.utils.formatdate(localtime=True)}\r\n".encode()
    if "message-id" not in names:
        out += f"Message-ID: {email.utils.make_msgid(domain=domain)}\r\n".encode()
    return out


# --- dropping it ------------------------------------------------------------------------------


def invoking_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def send(opts: Options, cfg: config.Config, stdin: BinaryIO) -> int:
    """Read the message, drop it, exit 0 (the daemon takes it, now or at its next start)."""
    prepared = prepare(opts, stdin.read(), cfg, invoking_user())
    envelope = maildrop.Envelope(prepared.sender, prepared.recipients, opts.ret, opts.envid,
                                 opts.notify)  # fmt: skip
    drop(cfg, envelope, prepared.data)
    return 0


def drop(cfg: config.Config, envelope: maildrop.Envelope, data: bytes) -> str:
    """Into the maildrop; Fail 69 when it is missing or not ours to write, 75 when it is full."""
    directory = cfg.sendmail.maildrop
    try:
        return maildrop.drop(directory, envelope, data)
    except (FileNotFoundError, NotADirectoryError):
        raise Fail(f"sendmail: the maildrop {directory} does not exist (see README, relay "
                   "sendmail)", EX_UNAVAILABLE) from None  # fmt: skip
    except PermissionError:
        raise Fail(f"sendmail: the maildrop {directory} is not writable by this user "
                   "(mode 3733 expected)", EX_UNAVAILABLE) from None  # fmt: skip
    except OSError as exc:
        raise Fail(f"sendmail: the maildrop {directory} cannot take the message now: "
                   f"{exc.strerror}", EX_TEMPFAIL) from None  # fmt: skip


def load_config(opts: Options) -> config.Config:
    path = opts.config or os.environ.get("RELAY_CONFIG")
    if path is None and os.path.exists("/etc/relay/relay.yaml"):
        path = "/etc/relay/relay.yaml"
    try:
        return config.load(path)
    except config.ConfigError as exc:
        raise Fail(f"sendmail: configuration error: {exc}", EX_UNAVAILABLE) from None


def run(opts: Options) -> int:
    """The send and -bs modes (-bp and -q are `relay queue list` and `flush`)."""
    cfg = load_config(opts)
    if opts.mode == "bs":
        from relay.cli import stdio_smtp  # only -bs needs it

        return stdio_smtp.serve(
            sys.stdin.buffer, sys.stdout.buffer, cfg.smtp.hostname, lambda env: taken(cfg, env),
            default_domain=cfg.sendmail.default_domain, max_size=cfg.smtp.max_message_size,
            max_recipients=cfg.smtp.max_recipients,
        )  # fmt: skip
    return send(opts, cfg, sys.stdin.buffer)


def taken(cfg: config.Config, env: StdioEnvelope) -> str:
    """One message of a -bs session into the maildrop (NOTIFY when every recipient gave the same;
    the maildrop keeps one for the message)."""
    given = {tuple(v) for v in env.notify.values()}
    same = len(given) == 1 and len(env.notify) == len(env.recipients)
    notified = list(given.pop()) if same else None
    envelope = maildrop.Envelope(env.sender, list(env.recipients), env.ret, env.envid, notified)
    header, body = split(env.data)
    domain = cfg.sendmail.default_domain or cfg.smtp.hostname
    names = {name for name, _ in fields(header)}
    data = header + missing(names, env.sender or f"MAILER-DAEMON@{domain}", None, domain) + body
    return f"250 2.0.0 Ok: queued as maildrop/{drop(cfg, envelope, data)}"


def queue_command(action: str, config_file: str | None) -> int:
    """-bp and -q: `relay queue list` and `relay queue flush`, run as the relay command."""
    argv = [sys.executable, "-m", "relay", "queue", action]
    argv += ["--config", config_file] if config_file else []
    return subprocess.run(argv, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    """`relay sendmail` and the relay-sendmail script (which imports only this module and what
    it needs, not the daemon: a cron job pays 0.3 s, not 0.8). -bp and -q are the queue's list
    and flush."""
    try:
        opts = parse(list(sys.argv[1:] if argv is None else argv))
        if opts.mode in ("bp", "q"):
            return queue_command("list" if opts.mode == "bp" else "flush", opts.config)
        return run(opts)
    except Fail as exc:
        print(f"relay-sendmail: {str(exc).removeprefix('sendmail: ')}", file=sys.stderr)
        return exc.status
    except BrokenPipeError:
        return 0
