"""Who vouches for a delivery (CPU, the CLI as a user runs it): `pack --sign` / `push --sign`,
`fa4aot trust`, and install / pull refusing a tampered, an unsigned or an untrusted source (nothing
written) unless a pinned --sha256 or --insecure says otherwise."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import lzma
import tarfile
from pathlib import Path

import pytest
from helpers import run_cli

pytest.importorskip("cryptography", reason="signatures need the cryptography package (the cli extra)")

from fa4aot.compile.archive import MANIFEST_MEMBER  # noqa: E402


@pytest.fixture(scope="module")
def release(built_cache, tmp_path_factory):
    """A signing key, and archives of the fast cache's h100 entries: signed and unsigned."""
    d = tmp_path_factory.mktemp("release")
    public = run_cli("keygen", str(d / "release.key")).stdout.strip()
    pack = ("pack", "--cache", str(built_cache), "--target", "h100")
    run_cli(*pack, "-o", str(d / "signed.fa4"), "--sign", str(d / "release.key"))
    run_cli(*pack, "-o", str(d / "unsigned.fa4"))
    return d, public


def _trusting(root: Path, public: str) -> Path:
    run_cli("trust", "add", public, "--cache", str(root), "--comment", "release CI")
    return root


def _rewrite_document(src: Path, dst: Path, change) -> None:
    """``src`` with its manifest member changed by ``change`` (every other member, the signature
    included, kept byte for byte)."""
    tar_in = tarfile.open(fileobj=io.BytesIO(lzma.decompress(src.read_bytes())))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar_out:
        for m in tar_in.getmembers():
            data = tar_in.extractfile(m).read()
            if m.name == MANIFEST_MEMBER:
                doc = json.loads(data)
                change(doc)
                data = json.dumps(doc, sort_keys=True, indent=0).encode()
            m.size = len(data)
            tar_out.addfile(m, io.BytesIO(data))
    dst.write_bytes(lzma.compress(out.getvalue(), format=lzma.FORMAT_XZ))


def _refused(p, *words: str) -> None:
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in p.stderr, p.stderr


def test_a_signed_archive_installs_where_its_key_is_trusted(release, tmp_path):
    d, public = release
    node = _trusting(tmp_path / "node", public)
    out = run_cli("install", str(d / "signed.fa4"), "--cache", str(node)).stdout
    assert "added" in out and "0 added" not in out
    assert run_cli("trust", "list", "--cache", str(node)).stdout.startswith(public)


def test_a_tampered_signed_archive_is_refused_and_nothing_is_written(release, tmp_path):
    d, public = release
    node = _trusting(tmp_path / "node", public)

    def drop_an_entry(doc):  # a smaller, still self-consistent archive: only the signature notices
        doc["entries"] = doc["entries"][1:]

    _rewrite_document(d / "signed.fa4", tmp_path / "bad.fa4", drop_an_entry)
    _refused(run_cli("install", str(tmp_path / "bad.fa4"), "--cache", str(node), check=False), "does not match")
    assert not (node / "index").exists() and not (node / "blobs").exists()


def test_an_unsigned_archive_needs_a_pinned_sha256_or_insecure(release, tmp_path):
    d, public = release
    node = _trusting(tmp_path / "node", public)
    unsigned = d / "unsigned.fa4"
    _refused(run_cli("install", str(unsigned), "--cache", str(node), check=False), "not signed", "--insecure")
    _refused(
        run_cli("install", str(unsigned), "--cache", str(node), "--sha256", "0" * 64, check=False), "not the pinned"
    )
    assert not (node / "index").exists()
    digest = hashlib.sha256(unsigned.read_bytes()).hexdigest()
    assert "added" in run_cli("install", str(unsigned), "--cache", str(node), "--sha256", digest).stdout
    fresh = tmp_path / "fresh"
    _refused(run_cli("install", str(unsigned), "--cache", str(fresh), check=False), "trusts no key")
    assert not fresh.exists()  # a refused install creates nothing
    assert "added" in run_cli("install", str(unsigned), "--cache", str(fresh), "--insecure").stdout


def test_a_key_the_cache_does_not_trust_is_refused(release, tmp_path):
    d, _ = release
    other = run_cli("keygen", str(tmp_path / "other.key")).stdout.strip()
    node = _trusting(tmp_path / "node", other)
    _refused(run_cli("install", str(d / "signed.fa4"), "--cache", str(node), check=False), "does not trust")
    run_cli("trust", "remove", other, "--cache", str(node))
    assert "trusts no key" in run_cli("trust", "list", "--cache", str(node)).stdout


def test_trust_add_refuses_what_is_not_a_key(tmp_path):
    for bad in ("ed25519:short", "rsa:AAAA", "ed25519:" + base64.b64encode(bytes(31)).decode()):
        _refused(run_cli("trust", "add", bad, "--cache", str(tmp_path), check=False), "not a public key")
    assert not (tmp_path / "trust").exists()


def test_a_signed_store_pulls_where_trusted_and_a_changed_record_is_refused(release, built_cache, tmp_path):
    d, public = release
    store = tmp_path / "store"
    run_cli("push", str(store), "--cache", str(built_cache), "--target", "h100", "--sign", str(d / "release.key"))
    _refused(run_cli("pull", str(store), "--cache", str(tmp_path / "a"), check=False), "does not trust")
    assert "pulled" in run_cli("pull", str(store), "--cache", str(_trusting(tmp_path / "b", public))).stdout
    record = sorted((store / "entries").iterdir())[0]
    doc = json.loads(record.read_text())
    doc["created"] += 1  # a well-formed record whose key still recomputes: only its hash differs
    record.write_text(json.dumps(doc))
    node = _trusting(tmp_path / "c", public)
    _refused(run_cli("pull", str(store), "--cache", str(node), check=False), "does not match its hash")
    assert not (node / "index").exists()
    digest = hashlib.sha256((store / "INDEX.json").read_bytes()).hexdigest()
    _refused(run_cli("pull", str(store), "--cache", str(tmp_path / "d"), "--sha256", digest, check=False), "tampered")


def test_a_store_without_a_signed_index_needs_insecure(release, built_cache, tmp_path):
    store = tmp_path / "store"
    run_cli("push", str(store), "--cache", str(built_cache), "--target", "h100")
    (store / "INDEX.json").unlink()  # as an older fa4aot pushed it
    _refused(run_cli("pull", str(store), "--cache", str(tmp_path / "a"), check=False), "INDEX.json", "--insecure")
    assert "pulled" in run_cli("pull", str(store), "--cache", str(tmp_path / "b"), "--insecure").stdout


@pytest.fixture
def wheel_cache(release, tmp_path):
    """A cache as a signed cache wheel installs it (entries, then its files signed)."""
    from fa4aot.core.signing import Signer, sign_cache_files

    d, public = release
    root = tmp_path / "site" / "fa4aot_cache_x" / "cache"
    run_cli("install", str(d / "unsigned.fa4"), "--cache", str(root), "--insecure")
    sign_cache_files(root, Signer.load(d / "release.key"))
    return root, public


def _choose(root: Path, tmp_path: Path):
    from fa4aot.runtime.loader import choose_cache, host_arch

    places = [("wheel x (fa4aot_cache_x:cache_dir)", root), ("./cache", tmp_path / "none")]
    return choose_cache(None, host_arch(), places=places)[0]


def test_a_runtime_with_trusted_keys_loads_only_cache_wheels_they_signed(wheel_cache, tmp_path, monkeypatch):
    from fa4aot.core.errors import CacheError

    root, public = wheel_cache
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("FA4AOT_TRUSTED_KEYS", raising=False)
    assert _choose(root, tmp_path).startswith("wheel")  # no keys configured: signatures not required
    monkeypatch.setenv("FA4AOT_TRUSTED_KEYS", public)
    assert _choose(root, tmp_path).startswith("wheel")
    other = run_cli("keygen", str(tmp_path / "other.key")).stdout.strip()
    monkeypatch.setenv("FA4AOT_TRUSTED_KEYS", other)
    with pytest.warns(RuntimeWarning, match="does not trust"), pytest.raises(CacheError):
        _choose(root, tmp_path)  # passed over, and ./cache does not exist
    monkeypatch.delenv("FA4AOT_TRUSTED_KEYS")
    (tmp_path / "config" / "fa4aot").mkdir(parents=True)
    (tmp_path / "config" / "fa4aot" / "trusted_keys").write_text(public + "  # release CI\n")
    assert _choose(root, tmp_path).startswith("wheel")
    packed = next(p for p in sorted((root / "packed").iterdir()) if not p.name.startswith("."))
    packed.write_bytes(packed.read_bytes() + b"\0")  # changed after signing
    with pytest.warns(RuntimeWarning, match="differ from the ones"), pytest.raises(CacheError):
        _choose(root, tmp_path)
    for f in root.glob("signed-files.json*"):
        f.unlink()
    with pytest.warns(RuntimeWarning, match="not signed"), pytest.raises(CacheError):
        _choose(root, tmp_path)


def test_a_signing_push_never_vouches_for_hashes_it_did_not_sign(release, built_cache, tmp_path):
    """An INDEX.json someone else changed in the store is not carried into the next signed push:
    entries that push did not upload are then not vouched for, and pull refuses them."""
    d, public = release
    store = tmp_path / "store"
    key = str(d / "release.key")
    run_cli("push", str(store), "--cache", str(built_cache), "--target", "h100", "--sign", key)
    doc = json.loads((store / "INDEX.json").read_text())
    victim = sorted(doc["records"])[0]
    doc["records"][victim] = "0" * 64  # a forged hash (its signature no longer matches)
    (store / "INDEX.json").write_text(json.dumps(doc, sort_keys=True))
    run_cli("push", str(store), "--cache", str(built_cache), "--target", "b200", "--sign", key)
    signed = json.loads((store / "INDEX.json").read_text())["records"]
    assert victim not in signed and signed  # dropped, not re-signed; b200's entries are there
    node = _trusting(tmp_path / "node", public)
    assert "pulled" in run_cli("pull", str(store), "--cache", str(node), "--target", "b200").stdout
