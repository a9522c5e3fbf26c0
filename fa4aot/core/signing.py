"""Who vouches for a cache: ed25519 signatures over the documents that name every byte of a
delivery (an archive's ``fa4aot-archive.json``, a store's signed index), and the keys a cache
trusts (``<cache>/trust/keys``, edited with ``fa4aot trust``).

A document lists each entry's record and every blob's sha256, so one signature over its exact
bytes authenticates the records (and through them the launch plans, native code the runtime
loads) and the blobs. Keys are written ``ed25519:<base64 of the 32-byte public key>``. The
``cryptography`` package (PyCA, part of the ``cli`` extra) does the arithmetic; it is imported
only when a signature is made or checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fa4aot.core import env, safejson
from fa4aot.core.errors import Fa4aotError

KEY_PREFIX = "ed25519:"
SIGNATURE_FORMAT = "fa4aot-signature/1"
#: The file of a cache that lists its trusted keys, one per line (``KEY [comment]``).
TRUST_FILE = Path("trust") / "keys"
#: Environment variable naming a private key file for ``pack`` / ``push`` (``--sign`` overrides).
SIGNING_KEY_ENV = env.SIGNING_KEY
#: A signature document is ~200 bytes; a trust file a few lines.
MAX_SIGNATURE_BYTES = 4096
MAX_TRUST_FILE_BYTES = 1 << 20
_RAW_KEY_BYTES = 32  # RFC 8032: an ed25519 public key is 32 bytes


class TrustError(Fa4aotError):
    """A delivery is unsigned, signed by a key the cache does not trust, or its signature or
    pinned hash does not match."""


def _crypto() -> Any:
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise TrustError(
            "signatures need the 'cryptography' package: install fa4aot's cli extra (pip install '.[cli]' in its checkout) (or pass --insecure to "
            "install without checking who made the archive)"
        ) from None
    return ed25519, serialization, InvalidSignature


def parse_key(text: str) -> bytes:
    """The 32 raw bytes of a public key written ``ed25519:<base64>``; :class:`TrustError` if not."""
    text = text.strip()
    if not text.startswith(KEY_PREFIX):
        raise TrustError(f"{text[:60]!r} is not a public key (expected {KEY_PREFIX}<base64>)")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
    except ValueError:
        raw = b""
    if len(raw) != _RAW_KEY_BYTES:
        raise TrustError(f"{text[:60]!r} is not a public key (not 32 bytes of base64)")
    return raw


def format_key(raw: bytes) -> str:
    return KEY_PREFIX + base64.b64encode(raw).decode()


def generate(path: Path) -> str:
    """Write a new private key to ``path`` (PEM, mode 0600; refuses to overwrite) and its public
    key to ``path.pub``; returns the public key."""
    ed25519, serialization, _ = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = format_key(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise TrustError(f"{path} exists: not overwriting a key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    Path(f"{path}.pub").write_text(public + "\n")
    return public


@dataclass(frozen=True)
class Signer:
    """A private key loaded for signing, and its public key."""

    key: Any
    public: str

    @classmethod
    def load(cls, path: str | Path) -> Signer:
        """The private key in ``path`` (PEM, as :func:`generate` writes)."""
        ed25519, serialization, _ = _crypto()
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise TrustError(f"cannot read the signing key {path}: {e}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise TrustError(f"{path} is not an ed25519 private key")
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(key, format_key(raw))

    def sign(self, document: bytes) -> bytes:
        """The signature document over ``document``'s exact bytes."""
        sig = base64.b64encode(self.key.sign(document)).decode()
        doc = {
            "format": SIGNATURE_FORMAT,
            "key": self.public,
            "sha256": hashlib.sha256(document).hexdigest(),
            "signature": sig,
        }
        return json.dumps(doc, sort_keys=True).encode()


def verify(document: bytes, signature: bytes, trusted: list[str], what: str) -> str:
    """Check ``signature`` (a signature document) over ``document`` by one of ``trusted``; returns
    the signing key. :class:`TrustError` naming ``what`` otherwise."""
    sig = safejson.loads(signature, f"{what}: signature", max_bytes=MAX_SIGNATURE_BYTES, error=TrustError)
    if not isinstance(sig, dict) or sig.get("format") != SIGNATURE_FORMAT:
        raise TrustError(f"{what}: the signature is not a {SIGNATURE_FORMAT} document")
    key = str(sig.get("key", ""))
    raw = parse_key(key)
    if key not in trusted:
        raise TrustError(
            f"{what} is signed by {key}, which this cache does not trust (add it with `fa4aot trust add KEY` "
            "after checking it out of band)"
        )
    ed25519, _, invalid = _crypto()
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(raw).verify(
            base64.b64decode(str(sig.get("signature", ""))), document
        )
    except (invalid, ValueError):
        raise TrustError(f"{what}: the signature by {key} does not match (tampered or damaged)") from None
    return key


# -- the keys a cache trusts ---------------------------------------------------------------------


def trusted_keys(root: str | Path) -> list[str]:
    """The public keys ``<root>/trust/keys`` lists (none when the file does not exist)."""
    return trusted_keys_file(Path(root) / TRUST_FILE)


def trusted_keys_file(path: Path) -> list[str]:
    """The public keys a trust file lists (``KEY [# comment]`` lines; none when it does not exist)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TRUST_FILE_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise TrustError(f"cannot read {path}: {e}") from None
    if len(data) > MAX_TRUST_FILE_BYTES:
        raise TrustError(f"{path} is larger than {MAX_TRUST_FILE_BYTES} bytes")
    keys = []
    for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        word = line.split("#", 1)[0].split()
        if word:
            try:
                parse_key(word[0])
            except TrustError as e:
                raise TrustError(f"{path}:{n}: {e}") from None
            keys.append(word[0])
    return keys


def write_trusted(root: str | Path, keys: list[tuple[str, str]]) -> Path:
    """Replace ``<root>/trust/keys`` with ``keys`` (key, comment), atomically."""
    path = Path(root) / TRUST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{k}  # {c}\n" if c else f"{k}\n" for k, c in keys)
    tmp = path.with_name(f".keys.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def trust_lines(root: str | Path) -> list[tuple[str, str]]:
    """(key, comment) of each line of ``<root>/trust/keys``."""
    out = []
    for line in ((Path(root) / TRUST_FILE).read_text() if (Path(root) / TRUST_FILE).exists() else "").splitlines():
        key, _, comment = line.partition("#")
        if key.strip():
            out.append((key.strip(), comment.strip()))
    return out


@dataclass(frozen=True)
class Policy:
    """What an install or pull requires of its source: a signature by one of ``trusted``, or the
    sha256 ``pinned`` out of band, or nothing (``insecure``)."""

    trusted: tuple[str, ...] = ()
    pinned: str | None = None
    insecure: bool = False

    def check_signature(self, document: bytes, signature: bytes | None, what: str) -> str | None:
        """The key that signed ``document`` if it is trusted (a bad signature by a trusted key is
        always refused); None where the source may go on unsigned or untrusted (a pinned hash, to
        be checked at the end, or ``insecure``). :class:`TrustError` otherwise."""
        if signature is None:
            self.check_unsigned(what)
            return None
        try:
            return verify(document, signature, list(self.trusted), what)
        except TrustError as e:
            if "does not trust" in str(e) and (self.insecure or self.pinned is not None):
                return None
            raise

    def check_unsigned(self, what: str) -> None:
        """Raise unless an unsigned source is acceptable (insecure, or a pinned hash to check)."""
        if not self.insecure and self.pinned is None:
            keys = "it trusts no key yet" if not self.trusted else f"it trusts {len(self.trusted)} key(s)"
            raise TrustError(
                f"{what} is not signed and no --sha256 was given ({keys}): ask its publisher for a signed archive "
                "(fa4aot pack --sign) or its sha256, or pass --insecure to install it unchecked"
            )

    def check_pinned(self, digest: str, what: str) -> None:
        """Raise when a pinned hash is given and ``digest`` is not it."""
        if self.pinned is not None and digest != self.pinned.lower():
            raise TrustError(f"{what} has sha256 {digest}, not the pinned {self.pinned}: refused")


# -- cache wheels: a signature over the files a runtime reads -------------------------------------

#: In a signed cache directory (a cache wheel's): the sha256 of every file the runtime and the CLI
#: read other than blobs (blobs are checked against the records those files hold), and its signature.
CACHE_FILES_DOC = "signed-files.json"
CACHE_FILES_FORMAT = "fa4aot-cache-files/1"
_SIGNED_DIRS = ("index", "packed")
#: Environment variable listing the keys a runtime requires cache wheels to be signed by.
RUNTIME_KEYS_ENV = env.TRUSTED_KEYS


def _cache_files(root: Path) -> dict[str, str]:
    files = {"FORMAT": hashlib.sha256((root / "FORMAT").read_bytes()).hexdigest()}
    for d in _SIGNED_DIRS:
        for p in sorted((root / d).iterdir()) if (root / d).is_dir() else []:
            if p.is_file() and not p.name.startswith("."):
                files[f"{d}/{p.name}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def sign_cache_files(root: str | Path, signer: Signer) -> None:
    """Write ``root/signed-files.json`` (and its ``.sig``): the hashes of the cache's format,
    index and packed index files, for a cache that will not change (a wheel's)."""
    root = Path(root)
    doc = json.dumps({"format": CACHE_FILES_FORMAT, "files": _cache_files(root)}, sort_keys=True).encode()
    (root / CACHE_FILES_DOC).write_bytes(doc)
    (root / f"{CACHE_FILES_DOC}.sig").write_bytes(signer.sign(doc))


def runtime_trusted_keys() -> list[str]:
    """The keys cache wheels must be signed by: ``$FA4AOT_TRUSTED_KEYS`` (space or comma
    separated) and ``$XDG_CONFIG_HOME/fa4aot/trusted_keys`` (``~/.config``); none: wheels are
    not required to be signed."""
    keys = (env.get(RUNTIME_KEYS_ENV) or "").replace(",", " ").split()
    for k in keys:
        parse_key(k)
    config = Path(env.get(env.XDG_CONFIG_HOME) or Path.home() / ".config") / "fa4aot"
    keys += [k for k in trusted_keys_file(config / "trusted_keys") if k not in keys]
    return keys


def check_cache_files(root: str | Path, trusted: list[str], what: str) -> str:
    """Check a signed cache directory against ``trusted``: the signature, then that its format,
    index and packed files are exactly the ones signed; returns the signing key."""
    root = Path(root)
    try:
        doc = (root / CACHE_FILES_DOC).read_bytes()
        sig = (root / f"{CACHE_FILES_DOC}.sig").read_bytes()
    except FileNotFoundError:
        raise TrustError(f"{what} is not signed, and {RUNTIME_KEYS_ENV} requires signed cache wheels") from None
    key = verify(doc, sig, trusted, what)
    files = safejson.loads(doc, f"{what}: {CACHE_FILES_DOC}", error=TrustError).get("files")
    if files != _cache_files(root):
        raise TrustError(f"{what}: its files differ from the ones {key} signed (changed after signing): refused")
    return key
