"""DKIM signing stage: keygen's record served by a real DNS server verifies what Signer signs."""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
from collections.abc import Callable
from pathlib import Path

import dkim  # type: ignore[import-untyped]
import dns.resolver
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config.dkim import DEFAULT_DKIM_HEADERS, DkimConfig, DkimKey
from relay.intake.dkim import DkimError, Signer, body_hash, keygen
from tests.support.dns import DnsServer

DOMAIN, SELECTOR = "example.test", "s1"
MESSAGE = (
    b"Received: from app.example.test by relay.test; Mon, 2 Jun 2025 10:00:00 +0000\r\n"
    b'From: "Alice Example" <alice@example.test>\r\n'
    b"To: bob@example.org\r\n"
    b"Subject: quarterly report\r\n"
    b"Date: Mon, 2 Jun 2025 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"X-Mailer: app 1.0\r\n"
    b"\r\n"
    b"Hello Bob,\r\nthe numbers are in.\r\n"
)
# RFC 8410 §10.3's example Ed25519 private key.
ED25519_PEM = b"""-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC
-----END PRIVATE KEY-----
"""
RSA_512_PEM = b"""-----BEGIN RSA PRIVATE KEY-----
MIIBOgIBAAJBAK+pDV/Emr/sWhaj4c9V6qXSChvFb/Vsoq23YnWfdZwxaNTWb+dL
6Qu2aN9jRTxSMq6vRatChazEqfDH41aEtIkCAwEAAQJAf0qO4X4z8a4RXmSlpryI
zF7XamZ5iiyN+jpww/GopWTIooWJL/awVzE9Ev4OVUUnfxTQOyYD2NUcT+OC1HIO
DQIhAOKQQoaTbEhsS/RmsTmgsLp8qmKajDMd96RNzzvl2x7TAiEAxnuzNzIvAZfN
JIjZoEEkrOhjfm4qd1PDr1W0dH1G3bMCIAxUy7olZfxfIJcxy62WSGguBtwNC1pw
5BymO4RIE3APAiBm5tDmJ91Y7RONAmoZfEyAXEbg0Eqx7LqCF2PkFOL9owIhANCi
qDRs+GZ/yQftvyXBCHi+D0ZzCvhpvtwvfRW/w0c3
-----END RSA PRIVATE KEY-----
"""


@pytest.fixture(scope="module")
def generated() -> tuple[bytes, str]:
    """One 2048-bit key for the module: pure-Python generation takes about a second."""
    return keygen(DOMAIN, SELECTOR)


@pytest.fixture
def key_file(generated: tuple[bytes, str], tmp_path: Path) -> Path:
    path = tmp_path / "example.test.pem"
    path.write_bytes(generated[0])
    return path


@pytest.fixture
def published(generated: tuple[bytes, str], dns_server: DnsServer) -> DnsServer:
    """dns_server serving the TXT record keygen made, as an operator would paste it."""
    name, rdata = generated[1].split(" IN TXT ")
    dns_server.record(name, "TXT", rdata)
    return dns_server


def whole(signer: Signer, message: bytes) -> bytes | None:
    """Sign a whole message as the intake does: the header block, then the body in pieces."""
    end = message.find(b"\r\n\r\n")
    cut = len(message) if end < 0 else end + 4
    body = message[cut:]
    return signer.sign(message[:cut], (body[i : i + 7] for i in range(0, len(body), 7)))


def signer(key_file: Path, headers: tuple[str, ...] = DEFAULT_DKIM_HEADERS) -> Signer:
    return Signer(DkimConfig(keys=(DkimKey(DOMAIN, SELECTOR, key_file),), headers=headers))


def txt_lookup(server: DnsServer) -> Callable[..., bytes | None]:
    """dkimpy's dnsfunc: (name as bytes, timeout=) -> the TXT strings joined, or None."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode(), "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)

    return lookup


def verifies(message: bytes, server: DnsServer) -> bool:
    return bool(dkim.verify(message, dnsfunc=txt_lookup(server)))


def tags(signature: bytes) -> dict[str, str]:
    """The DKIM-Signature's tags, unfolded and without whitespace (RFC 6376 §3.2)."""
    value = re.sub(rb"\s", b"", signature.split(b":", 1)[1]).decode()
    return dict(tag.split("=", 1) for tag in value.strip(";").split(";"))


def signed_headers(signature: bytes) -> list[str]:
    return tags(signature)["h"].split(":")


def test_signed_message_verifies_against_the_published_record(
    key_file: Path, published: DnsServer
) -> None:
    signature = whole(signer(key_file), MESSAGE)

    assert signature is not None
    assert signature.startswith(b"DKIM-Signature: ") and signature.endswith(b"\r\n")
    assert b"\n" not in signature.replace(b"\r\n", b"")  # CRLF throughout, folded lines too
    assert verifies(signature + MESSAGE, published)
    found = tags(signature)
    assert (found["d"], found["s"], found["a"], found["c"]) == (
        DOMAIN, SELECTOR, "rsa-sha256", "relaxed/relaxed",
    )  # fmt: skip
    assert published.queries(f"{SELECTOR}._domainkey.{DOMAIN}", "TXT") == 1


@pytest.mark.parametrize(
    ("change", "still_verifies"),
    [
        (lambda m: m.replace(b"numbers are in", b"numbers are on"), False),
        (lambda m: m.replace(b"quarterly report", b"quarterly rep0rt"), False),
        (lambda m: m.replace(b"alice@example.test", b"alice@example.tesT"), False),
        (lambda m: b"Received: from relay.test by mx.example.org\r\n" + m, True),
        (lambda m: m.replace(b"X-Mailer: app 1.0", b"X-Mailer: other 2.0"), True),
        # Relaxed/relaxed (RFC 6376 §3.4.2, §3.4.4) forgives whitespace changes on the way.
        (lambda m: m.replace(b"Subject: quarterly", b"Subject:   quarterly"), True),
        (lambda m: m.replace(b"Hello Bob,", b"Hello   Bob,  "), True),
    ],
    ids=["body byte", "subject", "from", "received on top", "unsigned header", "header ws", "body ws"],
)  # fmt: skip
def test_what_breaks_the_signature(
    key_file: Path, published: DnsServer, change: Callable[[bytes], bytes], still_verifies: bool
) -> None:
    signature = whole(signer(key_file), MESSAGE)
    assert signature is not None
    assert verifies(signature + MESSAGE, published)

    assert verifies(change(signature + MESSAGE), published) is still_verifies


@pytest.mark.parametrize(
    ("from_lines", "domain"),
    [
        (b"From: alice@example.test\r\n", DOMAIN),
        (b'From: "Alice Example" <alice@example.test>\r\n', DOMAIN),
        (b"From: Alice <Alice@EXAMPLE.Test>\r\n", DOMAIN),
        (b"From: =?utf-8?q?J=C3=B6rg?= <j@example.test> (sales)\r\n", DOMAIN),
        (b"From: Alice\r\n <alice@example.test>\r\n", DOMAIN),
        (b"From: alice@other.test\r\n", None),
        (b"From: alice@sub.example.test\r\n", None),
        (b"", None),
        (b"From: \r\n", None),
        (b"From: alice@\r\n", None),
        (b"From: alice\r\n", None),
        (b"From: <>\r\n", None),
        (b"From: alice@example.test, bob@example.test\r\n", None),
        (b"From: alice@example.test\r\nFrom: alice@example.test\r\n", None),
    ],
)  # fmt: skip
def test_signing_domain_is_the_from_address_domain(
    key_file: Path, published: DnsServer, from_lines: bytes, domain: str | None
) -> None:
    message = from_lines + b"To: bob@example.org\r\nSubject: hi\r\n\r\nhello\r\n"

    signature = whole(signer(key_file), message)

    if domain is None:
        assert signature is None
    else:
        assert signature is not None
        assert tags(signature)["d"] == domain
        assert verifies(signature + message, published)


def test_message_that_is_not_rfc_5322_is_not_signed(key_file: Path) -> None:
    assert whole(signer(key_file), b"From: alice@example.test\r\nnot a header\r\n\r\nx\r\n") is None


def test_h_lists_configured_headers_present_once_per_instance(
    key_file: Path, published: DnsServer
) -> None:
    message = b"To: carol@example.org\r\n" + MESSAGE
    headers = ("to", "subject", "received", "x-mailer", "cc", "bcc")

    default = signed_headers(whole(signer(key_file), message) or b"")
    configured = whole(signer(key_file, headers), message)

    assert default == ["from", "subject", "date", "to", "to", "message-id"]
    assert configured is not None
    # "from" always; Received and Bcc never (RFC 6376 §5.4.1); absent Cc not at all.
    assert signed_headers(configured) == ["from", "to", "to", "subject", "x-mailer"]
    assert verifies(configured + message, published)
    assert not verifies(configured + message.replace(b"app 1.0", b"app 1.1"), published)


def test_no_key_for_the_from_domain_means_no_signature(key_file: Path) -> None:
    other = Signer(DkimConfig(keys=(DkimKey("other.test", SELECTOR, key_file),)))

    assert whole(other, MESSAGE) is None
    assert whole(Signer(DkimConfig()), MESSAGE) is None


def damaged(pem: bytes) -> bytes:
    """pem with one bit of its last CRT value (qInv) flipped: it still parses."""
    lines = pem.splitlines()
    der = bytearray(base64.b64decode(b"".join(lines[1:-1])))
    der[-1] ^= 1
    return b"\n".join([lines[0], base64.b64encode(bytes(der)), lines[-1], b""])


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "No such file or directory"),
        (b"", "not an unencrypted PEM RSA private key"),
        (b"ssh-rsa AAAAB3NzaC1yc2E alice@example.test\n", "not an unencrypted PEM RSA private key"),
        (b"-----BEGIN RSA PRIVATE KEY-----\nAAA\n-----END RSA PRIVATE KEY-----\n", "not an unencrypted PEM RSA private key"),
        (ED25519_PEM, "not an unencrypted PEM RSA private key"),
        (RSA_512_PEM, "512-bit RSA key, RFC 8301 §3.2 requires 1024"),
        (damaged, "damaged RSA key"),
    ],
    ids=["missing", "empty", "ssh key", "bad base64", "ed25519", "512 bits", "damaged"],
)  # fmt: skip
def test_unusable_key_file_is_one_line_naming_it(
    tmp_path: Path,
    generated: tuple[bytes, str],
    content: bytes | Callable[[bytes], bytes] | None,
    problem: str,
) -> None:
    path = tmp_path / "dkim.key"
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content(generated[0]))

    with pytest.raises(DkimError) as info:
        signer(path)

    assert str(info.value).startswith(f"DKIM key {path}: ")
    assert problem in str(info.value)
    assert "\n" not in str(info.value)


def test_key_file_with_crlf_line_endings_loads(key_file: Path, published: DnsServer) -> None:
    key_file.write_bytes(key_file.read_bytes().replace(b"\n", b"\r\n"))

    signature = whole(signer(key_file), MESSAGE)

    assert signature is not None and verifies(signature + MESSAGE, published)


def test_keygen_record_is_a_zone_file_line_in_255_character_strings(
    generated: tuple[bytes, str],
) -> None:
    pem, record = generated

    match = re.fullmatch(r'(\S+) IN TXT ((?:"[^"]*" ?)+)', record)

    assert match is not None and match.group(1) == "s1._domainkey.example.test."
    strings = re.findall(r'"([^"]*)"', match.group(2))
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    value = "".join(strings)
    assert value.startswith("v=DKIM1; k=rsa; p=")
    public = dkim.crypto.parse_public_key(base64.b64decode(value.split("p=")[1]))
    private = dkim.crypto.parse_pem_private_key(pem)
    assert pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----\n")
    assert pem.endswith(b"\n-----END RSA PRIVATE KEY-----\n")
    assert all(len(line) <= 64 for line in pem.splitlines())
    assert public["modulus"] == private["modulus"] == private["prime1"] * private["prime2"]
    assert private["modulus"].bit_length() == 2048
    assert public["publicExponent"] == private["publicExponent"] == 65537


@pytest.mark.parametrize("bits", [1024, 1025])
def test_keygen_makes_keys_of_the_size_asked(bits: int, tmp_path: Path) -> None:
    pem, record = keygen("Example.TEST.", "mail-2025", bits)
    (tmp_path / "key.pem").write_bytes(pem)

    signer(tmp_path / "key.pem")  # loads, and passes its own signature check

    assert dkim.crypto.parse_pem_private_key(pem)["modulus"].bit_length() == bits
    assert record.startswith('mail-2025._domainkey.Example.TEST. IN TXT "v=DKIM1; k=rsa; p=')


def test_keygen_refuses_keys_below_1024_bits() -> None:
    with pytest.raises(DkimError, match=r"^512-bit RSA key: RFC 8301 §3.2 requires at least 1024$"):
        keygen(DOMAIN, SELECTOR, 512)


WORDS = st.sampled_from([b"a", b" ", b"\t", b"b  c", b"d \t ", b".", b"\xc3\xa9"])
LINES = st.lists(st.lists(WORDS, max_size=4).map(b"".join), max_size=30).map(
    lambda lines: b"".join(line + b"\r\n" for line in lines)
)


@given(body=LINES, cuts=st.lists(st.integers(0, 200), max_size=6))
def test_body_hash_in_pieces_is_dkimpys_relaxed_body_hash(body: bytes, cuts: list[int]) -> None:
    """RFC 6376 §3.4.4 fed in pieces cut anywhere equals dkimpy's hash of the whole body."""
    bounds = [0, *sorted(min(c, len(body)) for c in cuts), len(body)]
    pieces = [body[a:b] for a, b in itertools.pairwise(bounds)]
    relaxed = dkim.canonicalization.Relaxed.canonicalize_body(body)
    assert body_hash(pieces) == hashlib.sha256(relaxed).digest()
