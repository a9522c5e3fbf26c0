"""Signatures and trusted keys (fa4aot.core.signing): what a signature covers, which keys a
cache trusts, and what an install policy accepts."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("cryptography", reason="signatures need the cryptography package (the cli extra)")

from fa4aot.core import signing  # noqa: E402
from fa4aot.core.signing import Policy, Signer, TrustError  # noqa: E402


@pytest.fixture
def signer(tmp_path):
    public = signing.generate(tmp_path / "key")
    s = Signer.load(tmp_path / "key")
    assert s.public == public == (tmp_path / "key.pub").read_text().strip()
    return s


def test_generate_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path, signer):
    assert os.stat(tmp_path / "key").st_mode & 0o077 == 0
    before = (tmp_path / "key").read_bytes()
    with pytest.raises(TrustError, match="not overwriting"):
        signing.generate(tmp_path / "key")
    assert (tmp_path / "key").read_bytes() == before


def test_a_signature_covers_every_byte_of_the_document(signer):
    doc = json.dumps({"entries": [{"key": "ab" * 8, "record": "{}"}]}).encode()
    sig = signer.sign(doc)
    assert signing.verify(doc, sig, [signer.public], "archive") == signer.public
    for i in (0, len(doc) // 2, len(doc) - 1):  # one flipped byte anywhere is refused
        bad = bytearray(doc)
        bad[i] ^= 1
        with pytest.raises(TrustError, match="does not match"):
            signing.verify(bytes(bad), sig, [signer.public], "archive")


def test_a_signature_by_a_key_the_cache_does_not_trust_is_refused(tmp_path, signer):
    other = Signer.load(tmp_path / "k2") if signing.generate(tmp_path / "k2") else None
    doc = b"{}"
    with pytest.raises(TrustError, match="does not trust"):
        signing.verify(doc, other.sign(doc), [signer.public], "archive")
    # a signature document claiming a trusted key but made by another is a mismatch
    forged = json.loads(other.sign(doc))
    forged["key"] = signer.public
    with pytest.raises(TrustError, match="does not match"):
        signing.verify(doc, json.dumps(forged).encode(), [signer.public], "archive")


@pytest.mark.parametrize(
    "sig",
    [
        b"",
        b"[" * 10000,
        b'{"format": "other"}',
        b'{"format": "fa4aot-signature/1", "key": "ed25519:AAAA"}',
        b"x" * 5000,
    ],
)
def test_damaged_signature_documents_get_a_typed_error(signer, sig):
    with pytest.raises(TrustError):
        signing.verify(b"{}", sig, [signer.public], "archive")


def test_trust_file_round_trip_and_malformed_lines(tmp_path, signer):
    assert signing.trusted_keys(tmp_path) == []
    signing.write_trusted(tmp_path, [(signer.public, "release key")])
    assert signing.trusted_keys(tmp_path) == [signer.public]
    (tmp_path / signing.TRUST_FILE).write_text(signer.public + "\nnot-a-key\n")
    with pytest.raises(TrustError, match=":2:"):
        signing.trusted_keys(tmp_path)


def test_policy_unsigned_needs_a_pin_or_insecure(signer):
    with pytest.raises(TrustError, match="not signed"):
        Policy((signer.public,)).check_signature(b"{}", None, "archive")
    assert Policy(pinned="ab" * 32).check_signature(b"{}", None, "archive") is None
    assert Policy(insecure=True).check_signature(b"{}", None, "archive") is None
    with pytest.raises(TrustError, match="not the pinned"):
        Policy(pinned="ab" * 32).check_pinned("cd" * 32, "archive")


def test_policy_bad_signature_by_a_trusted_key_is_refused_even_when_insecure(signer):
    sig = signer.sign(b"{}")
    assert Policy((signer.public,)).check_signature(b"{}", sig, "archive") == signer.public
    with pytest.raises(TrustError, match="does not match"):
        Policy((signer.public,), insecure=True).check_signature(b"{ }", sig, "archive")
