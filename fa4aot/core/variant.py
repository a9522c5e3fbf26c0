"""Variants and targets: the frozen values that name one compiled kernel.

Pure data, shared by the build and the runtime. A :class:`Variant` is one kernel family
instantiated with concrete compile-time fields for one :class:`Target`; its ``variant_id`` is what
the runtime looks up, and (with the toolchain versions) what the cache key hashes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, NamedTuple

from fa4aot.core.targets import ARCHES, SMEM_OPTIN_227_KIB

#: Bumped whenever the cache entry layout changes (3: the cubin is its own blob, shared by the
#: plans of every host arch).
CACHE_FORMAT_VERSION = 3
#: Bumped whenever the meaning of a variant field changes (it is hashed into every variant id).
VARIANT_SCHEMA_VERSION = 2

#: Default opt-in shared memory per block (bytes) for each architecture fa4aot builds for; the
#: keys are the arches a manifest target may name (fa4aot.core.targets.ARCHES).
SMEM_OPTIN_BYTES = {a.name: a.smem_optin for a in ARCHES.values()}
#: The FA4 forward family each arch runs (FA4 ``_flash_attn_fwd``: compute capability 9.x takes
#: FlashAttentionForwardSm90, 10.x FlashAttentionForwardSm100, 12.x FlashAttentionForwardSm120).
FORWARD_FAMILY = {a.name: a.forward for a in ARCHES.values()}
FORWARD_FAMILIES = tuple(dict.fromkeys(FORWARD_FAMILY.values()))


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the form every hash in fa4aot is taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def sha256_hex(data: bytes | str) -> str:
    """sha256 of bytes (or UTF-8 text) as lowercase hex."""
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()


class Target(NamedTuple):
    """The GPU SKU a cache is built for.

    ``num_sms`` is baked into FA4's host-side grid formulas at trace time, so it is part of every
    variant's identity; ``smem_optin_bytes`` answers the plan's attribute query when no GPU is
    present.
    """

    name: str
    arch: str
    num_sms: int
    l2_bytes: int | None = None
    smem_optin_bytes: int | None = None

    @property
    def compute_capability(self) -> tuple[int, int]:
        """(major, minor) of the arch, e.g. (10, 0) for sm_100a."""
        digits = self.arch.removeprefix("sm_").rstrip("af")
        return int(digits[:-1]), int(digits[-1])

    def optin_smem(self) -> int:
        """Opt-in shared memory per block for this target."""
        return self.smem_optin_bytes or SMEM_OPTIN_BYTES.get(self.arch, SMEM_OPTIN_227_KIB)

    def identity(self) -> dict[str, Any]:
        """The fields of the target that change generated code (the SKU name does not)."""
        return {"arch": self.arch, "num_sms": self.num_sms}

    def to_dict(self) -> dict[str, Any]:
        """The target as JSON-able fields, its opt-in shared memory resolved (never None)."""
        return {**self._asdict(), "smem_optin_bytes": self.optin_smem()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Target:
        return cls(
            name=d["name"],
            arch=d["arch"],
            num_sms=int(d["num_sms"]),
            l2_bytes=d.get("l2_bytes"),
            smem_optin_bytes=d.get("smem_optin_bytes"),
        )


class Variant(NamedTuple):
    """One kernel family with every compile-time field fixed, for one arch and SM count."""

    family: str
    arch: str
    num_sms: int
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, family: str, arch: str, num_sms: int, **params: Any) -> Variant:
        """Build a variant from keyword fields (stored sorted, so order never matters)."""
        return cls(family, arch, int(num_sms), tuple(sorted(params.items())))

    @property
    def fields(self) -> dict[str, Any]:
        return dict(self.params)

    def to_dict(self) -> dict[str, Any]:
        """The variant as JSON-able fields, its params a dict (what :attr:`variant_id` hashes)."""
        return {**self._asdict(), "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Variant:
        return cls.make(d["family"], d["arch"], d["num_sms"], **d["params"])

    @property
    def variant_id(self) -> str:
        """Stable 20-hex-digit id of the variant alone (what the runtime looks up)."""
        return sha256_hex(canonical_json({"v": VARIANT_SCHEMA_VERSION, **self.to_dict()}))[:20]

    def label(self) -> str:
        """Short human-readable description for tables."""
        parts = []
        for k, v in self.params:
            if isinstance(v, bool):
                if v:
                    parts.append(k)
            else:
                parts.append(f"{k}={v}")
        return f"{self.family}[{self.arch}] " + " ".join(parts)


def cache_key(variant: Variant, toolchain: Mapping[str, str], host_arch: str) -> str:
    """Content key of a built entry: variant, target, toolchain versions, host arch, format.

    Any change to what produces the code (a DSL or FA4 version, a ``kernels/`` source) gives a new
    key, so a stale artifact is never served for a new build.
    """
    payload = {
        "format": CACHE_FORMAT_VERSION,
        "variant": variant.to_dict(),
        "toolchain": dict(toolchain),
        "host_arch": host_arch,
    }
    return sha256_hex(canonical_json(payload))[:32]
