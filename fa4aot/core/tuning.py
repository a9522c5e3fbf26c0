"""Tuned dispatch: a measured table that replaces FA4's choice of launch/tiling variant for a
shape bucket with a faster one the cache holds.

Pure data and functions, shared by the runtime (which reads tables) and ``fa4aot tune`` (which
writes them). A table belongs to one target (arch, SM count) and one device name, because the
winner depends on the exact SKU (clocks, memory) and on nothing the cache key knows.

An entry says: "when FA4 would launch variant ``default`` for a call in ``bucket``, launch
``choice``". ``choice`` may differ from ``default`` only in :data:`TUNABLE_FIELDS` - tiles,
packing, staging, scheduling - never in a field that changes what is computed (dtype, head dims,
masking, varlen, LSE, paging, sink, softcap), so a tuned call stays in FA4's result class.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fa4aot.core import safejson
from fa4aot.core.errors import Fa4aotError
from fa4aot.core.variant import canonical_json, sha256_hex

#: Version of the table's JSON layout; a table of another version is ignored (with a warning).
TUNING_FORMAT = "fa4aot-tuning/1"

#: Fields a tuned choice may change, per family: how the work is tiled, packed and scheduled.
TUNABLE_FIELDS: dict[str, frozenset[str]] = {
    # another tiling of FA4's SM90 kernel: its MMA flags and FA4's register split follow the tile
    "fwd_sm90": frozenset(
        {"tile_m", "tile_n", "pack_gqa", "mma_pv_is_rs", "intra_wg_overlap", "regs_mma", "regs_producer"}
    ),
    "fwd_sm100": frozenset(
        {
            "tile_n",
            "q_stage",
            "use_2cta_instrs",
            "use_clc_scheduler",
            "is_static_persistent",
            "use_tma_o",
            "use_s_ping_pong",
            "pack_gqa",
            "kv_stage",
            "overlap_sO_sQ",
            "sm_stats_cross_stage",
            "lpt_global",
            "regs_softmax",
            "regs_correction",
            "regs_other",
        }
    ),  # fmt: skip
}

#: Largest table parsed (a table is a few KB; the runtime reads at most this much).
MAX_TABLE_BYTES = 16 * 1024 * 1024
#: Largest SM count a table may name (no GPU comes close; bounds what a damaged table can say).
MAX_NUM_SMS = 1 << 16
#: Longest error reason kept (a hostile value's repr can be megabytes).
MAX_REASON = 400

#: Bucket edges are powers of two: a bucket value b covers [2**(b-1), 2**b - 1] (b = bit_length).
BUCKET_AXES = ("rows", "nheads", "seqlen_q", "seqlen_k")


class TuningTableError(Fa4aotError):
    """A tuning table is corrupt, of another format, or for another target or device."""


def bucket(rows: int, nheads: int, seqlen_q: int, seqlen_k: int) -> tuple[int, int, int, int]:
    """The shape bucket of a call: log2 classes of ``rows`` (the batch; for packed varlen queries
    the total query tokens), query heads, and max_seqlen_q / max_seqlen_k."""
    return (rows.bit_length(), nheads.bit_length(), seqlen_q.bit_length(), seqlen_k.bit_length())


def bucket_range(b: int) -> tuple[int, int]:
    """The inclusive integer range a bucket value stands for."""
    return (0, 0) if b == 0 else (1 << (b - 1), (1 << b) - 1)


def result_class_difference(family: str, default: Mapping[str, Any], choice: Mapping[str, Any]) -> str | None:
    """Why ``choice`` cannot replace ``default`` (None when it can): a field outside
    :data:`TUNABLE_FIELDS` differs, or the family is not tunable."""
    tunable = TUNABLE_FIELDS.get(family)
    if tunable is None:
        return f"family {family} is not tuned"
    if set(default) != set(choice):
        return "the two variants have different fields"
    for k in sorted(default):
        if k not in tunable and default[k] != choice[k]:
            return f"{k} differs ({default[k]!r} vs {choice[k]!r}): that changes the result, not only the launch"
    return None


def device_slug(device_name: str) -> str:
    """A file-name-safe form of a CUDA device name (``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``)."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return slug or "unknown-device"


@dataclass(frozen=True)
class TuningEntry:
    """One measured decision. Times are CUDA-event medians in milliseconds on the tuned device;
    ``spread`` is the noise the win had to beat (relative inter-quartile range, at least 1%);
    ``shape`` is the measured call (a ``fa4aot tune --shapes`` spec); ``cubins`` the sha256 of
    the default's and the choice's cubins as measured (a rebuilt kernel makes the entry stale)."""

    default: str
    bucket: tuple[int, int, int, int]
    choice: str
    default_ms: float
    choice_ms: float
    spread: float
    shape: str = ""
    cubins: tuple[str, str] = ("", "")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["bucket"] = list(self.bucket)
        d["cubins"] = list(self.cubins)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TuningEntry:
        b = d["bucket"]
        if not (isinstance(b, list) and len(b) == len(BUCKET_AXES) and all(type(x) is int and 0 <= x <= 64 for x in b)):
            raise TuningTableError(f"entry bucket must be {len(BUCKET_AXES)} integers in 0..64, got {b!r}")
        for k in ("default", "choice"):
            if not (isinstance(d[k], str) and re.fullmatch(r"[0-9a-f]{20}", d[k])):
                raise TuningTableError(f"entry {k} must be a 20-hex-digit variant id, got {d[k]!r}")
        cubins = d.get("cubins", ["", ""])
        if not (
            isinstance(cubins, list) and len(cubins) == 2 and all(re.fullmatch(r"([0-9a-f]{64})?", c) for c in cubins)
        ):
            raise TuningTableError(f"entry cubins must be two sha256 hex digests, got {cubins!r}")
        times = [d["default_ms"], d["choice_ms"], d["spread"]]
        if not all(type(x) in (int, float) and 0 <= x < float("inf") for x in times):
            raise TuningTableError(f"entry times must be finite numbers >= 0, got {times!r}")
        return cls(
            d["default"],
            tuple(b),
            d["choice"],
            float(d["default_ms"]),
            float(d["choice_ms"]),
            float(d["spread"]),
            str(d.get("shape", "")),
            (cubins[0], cubins[1]),
        )


@dataclass(frozen=True)
class TuningTable:
    """A device's measured dispatch table for one target. ``measured`` keeps every timed shape
    (winners and not) for ``show-tuning``; only ``entries`` change dispatch."""

    arch: str
    num_sms: int
    device_name: str
    entries: tuple[TuningEntry, ...]
    measured: tuple[dict[str, Any], ...] = ()
    created: str = ""
    tool: str = ""

    def payload(self) -> dict[str, Any]:
        return {
            "format": TUNING_FORMAT,
            "arch": self.arch,
            "num_sms": self.num_sms,
            "device_name": self.device_name,
            "created": self.created,
            "tool": self.tool,
            "entries": [e.to_json() for e in self.entries],
            "measured": list(self.measured),
        }

    def to_bytes(self) -> bytes:
        """The file form: the payload plus the sha256 of its canonical JSON."""
        payload = self.payload()
        doc = {"sha256": sha256_hex(canonical_json(payload)), **payload}
        return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode()

    @property
    def sha256(self) -> str:
        return sha256_hex(canonical_json(self.payload()))

    @classmethod
    def from_bytes(cls, data: bytes) -> TuningTable:
        """Parse and verify a table file; any damage is a :class:`TuningTableError` saying what."""
        # bounded: deep nesting, NaN/Infinity and oversized documents are typed errors
        doc = safejson.loads(
            data, "not a JSON tuning table of finite numbers", max_bytes=MAX_TABLE_BYTES, error=TuningTableError
        )
        if not isinstance(doc, dict):
            raise TuningTableError("not a JSON object")
        if doc.get("format") != TUNING_FORMAT:
            raise TuningTableError(f"format is {doc.get('format')!r}, this fa4aot reads {TUNING_FORMAT!r}")
        want = doc.pop("sha256", None)
        if want != sha256_hex(canonical_json(doc)):
            raise TuningTableError("sha256 does not match the contents (edited or damaged)")
        try:
            if not isinstance(doc["entries"], list):
                raise TypeError("entries is not a list")
            entries = tuple(TuningEntry.from_json(e) for e in doc["entries"])
            measured = doc.get("measured", [])
            if not (isinstance(measured, list) and all(isinstance(m, dict) for m in measured)):
                raise TypeError("measured is not a list of objects")
            num_sms = doc["num_sms"]
            if type(num_sms) is not int or not 0 < num_sms <= MAX_NUM_SMS:  # 1e400 parses as inf
                raise ValueError(f"num_sms must be an integer in 1..{MAX_NUM_SMS}, got {num_sms!r}")
            table = cls(
                str(doc["arch"]),
                num_sms,
                str(doc["device_name"]),
                entries,
                tuple(measured),
                str(doc.get("created", "")),
                str(doc.get("tool", "")),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise TuningTableError(f"malformed table: {e!r}"[:MAX_REASON]) from None
        seen = set()
        for e in entries:
            if (e.default, e.bucket) in seen:
                raise TuningTableError(f"two entries for variant {e.default} in bucket {list(e.bucket)}")
            seen.add((e.default, e.bucket))
        return table

    def lookup_map(self, entries: Iterable[TuningEntry] | None = None) -> dict[str, dict[tuple, str]]:
        """default variant id -> bucket -> chosen variant id (what the runtime consults)."""
        out: dict[str, dict[tuple, str]] = {}
        for e in self.entries if entries is None else entries:
            out.setdefault(e.default, {})[e.bucket] = e.choice
        return out


def table_filename(arch: str, num_sms: int, device_name: str) -> str:
    """Where in a cache's ``tuning/`` directory the table for this target and device lives."""
    return f"{arch}-{num_sms}-{device_slug(device_name)}.json"
