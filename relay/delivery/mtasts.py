"""Delivery, MTA-STS: a recipient domain's own TLS policy (RFC 8461), found through its TXT
record, fetched over HTTPS from its policy host and parsed, and cached per domain while its id
stands."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.resolver

from relay.config.delivery import DeliveryConfig
from relay.delivery.resolver import Resolver, answer_ttl
from relay.mail.address import DOMAIN

STS_MODES = ("enforce", "testing", "none")
MAX_AGE_LIMIT = 31_557_600  # RFC 8461 §3.2: max_age is at most a year
MAX_POLICY_SIZE = 64 * 1024  # RFC 8461 §3.3: senders may refuse larger policy bodies
POLICY_PATH = "/.well-known/mta-sts.txt"  # RFC 8461 §3.3
# How long a domain without a usable policy (no TXT record, or a failed fetch) is left alone
# before discovery is tried again; a TXT record's own TTL is honoured when shorter.
RETRY_DISCOVERY = 300.0
CACHE_SIZE = 10_000

# RFC 8461 §3.1 and §3.2: field names of the TXT record and of the policy share one grammar.
FIELD_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}"
TXT_VERSION = re.compile(r"v[ \t]*=[ \t]*STSv1")
TXT_FIELD = re.compile(rf"({FIELD_NAME})[ \t]*=[ \t]*([\x21-\x3a\x3c\x3e-\x7e]+)")
TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
POLICY_FIELD = re.compile(rf"({FIELD_NAME}):[ \t]*(.*?)[ \t]*")
MAX_AGE = re.compile(r"[0-9]{1,10}")
MX_PATTERN = re.compile(rf"(?:\*\.)?{DOMAIN}")  # ["*."] Domain (RFC 5321 §4.1.2)


@dataclass(frozen=True)
class StsPolicy:
    """A parsed MTA-STS policy (RFC 8461 §3.2)."""

    mode: str  # enforce, testing or none
    max_age: int  # seconds, at most MAX_AGE_LIMIT
    mx: tuple[str, ...]  # lower-case host names and "*." patterns


class PolicyError(ValueError):
    """An MTA-STS policy that could not be fetched or is not valid."""


@dataclass
class _Cached:
    """What discovery found for a domain, as of the TXT record id it was found under."""

    id: str | None
    policy: StsPolicy | None  # None: no usable policy
    expires: float  # monotonic; the policy's max_age, or when to try discovery again
    recheck: float  # until then the TXT record is not looked up again


class MtaSts:
    """MTA-STS policies of recipient domains, cached per domain (RFC 8461 §5.1)."""

    def __init__(self, cfg: DeliveryConfig, context: ssl.SSLContext) -> None:
        self._cfg = cfg
        self._context = context  # verifies the policy host's certificate (RFC 8461 §3.3)
        self._resolver = Resolver(cfg.dns)
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        # One discovery at a time per domain, so a burst of mail makes one fetch.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def policy(self, domain: str) -> StsPolicy | None:
        """domain's MTA-STS policy; None when it has no usable one."""
        lock = self._locks.get(domain)
        if lock is None:
            lock = self._locks[domain] = asyncio.Lock()
        async with lock:
            return await self._discover(domain)

    async def _discover(self, domain: str) -> StsPolicy | None:
        """RFC 8461 §5.1: the cached policy while its TXT id stands, a fresh one when the id
        changes; a failed lookup or fetch falls back to the cache, else to no policy."""
        now = time.monotonic()
        cached = self._cache.get(domain)
        if cached is not None and now >= cached.expires:
            del self._cache[domain]
            cached = None
        if cached is not None and now < cached.recheck:
            return cached.policy
        try:
            policy_id, ttl = await self._record_id(domain)
        except dns.exception.DNSException:
            return self._failed(domain, cached, None, now)
        recheck = now + min(ttl, self._cfg.dns.max_cache_ttl)
        if cached is not None and (policy_id is None or policy_id == cached.id):
            # RFC 8461 §8.3: a vanished record does not withdraw a policy before its max_age.
            cached.recheck = min(recheck, cached.expires)
            return cached.policy
        if policy_id is None:
            self._remember(domain, _Cached(None, None, recheck, recheck))
            return None
        try:
            policy = await self._fetch(domain)
        except PolicyError:
            return self._failed(domain, cached, policy_id, now)
        expires = now + policy.max_age
        self._remember(domain, _Cached(policy_id, policy, expires, min(recheck, expires)))
        return policy

    def _failed(
        self, domain: str, cached: _Cached | None, policy_id: str | None, now: float
    ) -> StsPolicy | None:
        """Discovery failed: the cached policy stands (RFC 8461 §5.1), else there is none; not
        tried again for RETRY_DISCOVERY, so that a broken domain does not slow every delivery."""
        retry = now + RETRY_DISCOVERY
        if cached is not None:
            cached.recheck = min(retry, cached.expires)
            return cached.policy
        self._remember(domain, _Cached(policy_id, None, retry, retry))
        return None

    async def _record_id(self, domain: str) -> tuple[str | None, float]:
        """The id in _mta-sts.<domain>'s TXT record (None: no valid record) and how long that
        answer may be reused. DNSException when the lookup fails."""
        name = dns.name.from_text(f"_mta-sts.{domain}")
        try:
            answer = await self._resolver.lookup(name, "TXT")
        except dns.resolver.NXDOMAIN:
            return None, RETRY_DISCOVERY
        texts = [b"".join(record.strings).decode("latin-1") for record in answer]
        return record_id(texts), answer_ttl(answer)

    async def _fetch(self, domain: str) -> StsPolicy:
        """RFC 8461 §3.3: GET the policy over HTTPS from mta-sts.<domain>, its certificate
        verified, no redirects, within fetch_timeout; PolicyError for any failure."""
        host = dns.name.from_text(f"mta-sts.{domain}")
        name = host.to_text(omit_final_dot=True)
        sts = self._cfg.mta_sts
        try:
            async with asyncio.timeout(sts.fetch_timeout):
                addresses = await self._addresses(host)
                text = await https_get(addresses, name, sts.port, POLICY_PATH, self._context)
        except PolicyError:
            raise
        except TimeoutError:
            raise PolicyError(f"no policy from {name} within {sts.fetch_timeout:g}s") from None
        except (OSError, EOFError, ValueError, asyncio.LimitOverrunError) as exc:
            raise PolicyError(f"fetching {_url(name, sts.port)}: {exc}") from None
        except dns.exception.DNSException as exc:
            raise PolicyError(f"no address for {name}: {exc}") from None
        return parse_policy(text)

    async def _addresses(self, name: dns.name.Name) -> tuple[str, ...]:
        """name's addresses, IPv4 first, looked up as an MX host's are: a query that fails does
        not hide the other's answer (RFC 4074)."""
        addresses = await self._resolver.addresses(name)
        if not addresses.found:
            failed = [f"{rdtype}: {error}" for rdtype, error in addresses.failed]
            why = f" ({'; '.join(failed)})" if failed else ""
            raise PolicyError(f"{name.to_text(omit_final_dot=True)} has no address{why}")
        return addresses.found

    def _remember(self, domain: str, entry: _Cached) -> None:
        self._cache.pop(domain, None)
        self._cache[domain] = entry
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: "*.example.com" matches one more label in front (mx1.example.com, not
    example.com nor a.b.example.com); anything else matches the host name itself."""
    host = host.lower().rstrip(".")
    if not pattern.startswith("*."):
        return host == pattern
    label, dot, parent = host.partition(".")
    return bool(label) and bool(dot) and parent == pattern[2:]


def record_id(records: Sequence[str]) -> str | None:
    """RFC 8461 §3.1: the id of the one TXT record that is "v=STSv1; id=…"; None when no record
    or more than one starts with the version, or when that record is not valid."""
    candidates = [
        fields for fields in (record.split(";") for record in records)
        if TXT_VERSION.fullmatch(fields[0].rstrip(" \t"))
    ]  # fmt: skip
    if len(candidates) != 1:
        return None
    fields = [field.strip(" \t") for field in candidates[0][1:]]
    if fields and not fields[-1]:
        fields.pop()  # a trailing separator is allowed
    found = None
    for field in fields:
        match = TXT_FIELD.fullmatch(field)
        if match is None:
            return None
        name, value = match.groups()
        if name == "id":
            if not TXT_ID.fullmatch(value):
                return None
            found = found or value
    return found


def parse_policy(text: str) -> StsPolicy:
    """RFC 8461 §3.2: "key: value" lines ending in CRLF or LF. Unknown keys are ignored, a
    repeated key other than mx keeps its first value; PolicyError when the policy is invalid."""
    fields: dict[str, str] = {}
    patterns: list[str] = []
    for raw in text.split("\n"):
        line = raw.removesuffix("\r")
        if not line.strip(" \t"):
            continue
        match = POLICY_FIELD.fullmatch(line)
        if match is None:
            raise PolicyError(f"not a 'key: value' line: {line[:80]!r}")
        key, value = match.groups()
        if key == "mx":
            if not MX_PATTERN.fullmatch(value):
                raise PolicyError(f"mx {value!r} is not a host name or *.domain pattern")
            patterns.append(value.lower())
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError(f"version is {fields.get('version')!r}, not 'STSv1'")
    mode = fields.get("mode")
    if mode not in STS_MODES:
        raise PolicyError(f"mode is {mode!r}, not one of {', '.join(STS_MODES)}")
    max_age = fields.get("max_age")
    if max_age is None or not MAX_AGE.fullmatch(max_age):
        raise PolicyError(f"max_age is {max_age!r}, not a number of seconds")
    if mode != "none" and not patterns:
        raise PolicyError(f"no mx in a policy in {mode} mode")
    return StsPolicy(mode, min(int(max_age), MAX_AGE_LIMIT), tuple(patterns))


async def https_get(
    addresses: Sequence[str], name: str, port: int, path: str, context: ssl.SSLContext
) -> str:
    """GET https://name:port/path from the first address that accepts a connection: the body
    of a 200 text/plain answer, at most MAX_POLICY_SIZE bytes of UTF-8. Redirects are not
    followed (RFC 8461 §3.3). Raises OSError, EOFError, ValueError or LimitOverrunError."""
    error: OSError = OSError(f"no address for {name}")
    for address in addresses:
        try:
            reader, writer = await asyncio.open_connection(
                address, port, ssl=context, server_hostname=name
            )
        except OSError as exc:
            error = exc
            continue
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {_authority(name, port)}\r\nAccept: text/plain\r\n"
                "Connection: close\r\nUser-Agent: relay\r\n\r\n".encode("ascii")
            )
            return await _response(reader)
        finally:
            # The answer is complete (or useless): no need to wait for a TLS close_notify.
            writer.transport.abort()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    raise error


def _authority(name: str, port: int) -> str:
    """The Host header's value: the port only when it is not HTTPS's (RFC 9110 §7.2)."""
    return name if port == 443 else f"{name}:{port}"


def _url(name: str, port: int) -> str:
    return f"https://{_authority(name, port)}{POLICY_PATH}"


async def _response(reader: asyncio.StreamReader) -> str:
    """The body of an HTTP/1.1 response, if it is a 200 text/plain one of bounded size."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status, *lines = head.split("\r\n")
    version, _, rest = status.partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or code != "200":
        raise ValueError(f"HTTP status {status!r}, not 200")
    headers = {}
    for line in lines:
        if line:
            key, colon, value = line.partition(":")
            if not colon:
                raise ValueError(f"malformed HTTP header {line[:80]!r}")
            headers[key.strip().lower()] = value.strip()
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "text/plain":
        raise ValueError(f"content type {media!r}, not text/plain")  # RFC 8461 §3.2
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _chunked(reader)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if length > MAX_POLICY_SIZE:
            raise ValueError(f"policy of {length} bytes is larger than {MAX_POLICY_SIZE}")
        body = await reader.readexactly(length)
    else:
        body = await _until_end(reader)
    return body.decode("utf-8")


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked body (RFC 9112 §7.1), at most MAX_POLICY_SIZE bytes; trailers are not read."""
    body = bytearray()
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        if len(body) + size > MAX_POLICY_SIZE:
            raise ValueError(f"policy larger than {MAX_POLICY_SIZE} bytes")
        body += await reader.readexactly(size)
        await reader.readexactly(2)  # the CRLF after the chunk
    return bytes(body)


async def _until_end(reader: asyncio.StreamReader) -> bytes:
    """A body delimited by the end of the connection, at most MAX_POLICY_SIZE bytes."""
    body = bytearray()
    while len(body) <= MAX_POLICY_SIZE and (chunk := await reader.read(MAX_POLICY_SIZE)):
        body += chunk
    if len(body) > MAX_POLICY_SIZE:
        raise ValueError(f"policy larger than {MAX_POLICY_SIZE} bytes")
    return bytes(body)
