"""``fa4aot tune``: measure, on the GPU it runs on, every candidate variant the cache holds for a
set of shapes against FA4's own choice, and store the winners as the cache's tuning table for
this device.

Shapes and candidates are pure (tested without a GPU); measuring needs torch and a CUDA GPU
(this is a tool, not the runtime). Method, per shape: every candidate (FA4's default first) is
timed in interleaved rounds, in a shuffled order each round, with the L2 cache flushed before
each timed call; CUDA events around single calls; medians. A candidate wins only when its median
beats the default's by more than the measured noise: the larger of either one's relative
inter-quartile range and :data:`MIN_GAIN`.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fa4aot.core.errors import Fa4aotError
from fa4aot.core.tuning import (
    BUCKET_AXES,
    TUNABLE_FIELDS,
    TuningEntry,
    TuningTable,
    bucket,
    bucket_range,
    result_class_difference,
    table_filename,
)
from fa4aot.core.variant import FORWARD_FAMILY, Target, Variant
from fa4aot.tools.fa4_calls import decide

#: A win must beat FA4's default by at least this fraction, even when the measured spread is lower.
MIN_GAIN = 0.01
#: Size of the buffer written between timed calls: twice the 50 MiB L2 of an H100 (and B200's 126 MiB
#: is covered by the target's own l2_bytes when the manifest gives it).
DEFAULT_FLUSH_BYTES = 2 * 50 * 1024 * 1024

#: Cycles of the busy kernel timed calls queue behind (about 2 ms at an H100's 1.7 GHz: longer than
#: the host needs to enqueue a round's calls and flushes).
QUEUE_SLEEP_CYCLES = 3_500_000

#: Longest shape label ``show-tuning`` prints from a table (a damaged one may hold anything).
MAX_SHAPE_CHARS = 200

_KEYS = {"b": "batch", "sq": "seqlen_q", "sk": "seqlen_k", "h": "nheads", "hk": "nheads_kv", "d": "head_dim"}


@dataclass(frozen=True)
class TuneShape:
    """One call shape to tune. Varlen shapes pack ``batch`` sequences whose lengths
    (:meth:`seqlens`) reach ``seqlen_q`` (queries and keys alike: a prefill)."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_kv: int
    head_dim: int
    causal: bool = False
    varlen: bool = False
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        for k in ("batch", "seqlen_q", "seqlen_k", "nheads", "nheads_kv", "head_dim"):
            v = getattr(self, k)
            if type(v) is not int or v < 1:
                raise Fa4aotError(f"shape {k} must be a positive integer, got {v!r}")
        if self.nheads % self.nheads_kv:
            raise Fa4aotError(f"shape nheads ({self.nheads}) must be a multiple of nheads_kv ({self.nheads_kv})")
        if self.varlen and self.seqlen_q != self.seqlen_k:
            raise Fa4aotError("a varlen tuning shape is a prefill: seqlen_q must equal seqlen_k")
        if self.dtype not in ("bf16", "fp16"):
            raise Fa4aotError(f"shape dtype must be bf16 or fp16, got {self.dtype!r}")

    def label(self) -> str:
        kind = "varlen" if self.varlen else "dense"
        mask = "causal" if self.causal else "full"
        s = f"s{self.seqlen_q}" if self.seqlen_q == self.seqlen_k else f"sq{self.seqlen_q} sk{self.seqlen_k}"
        return f"{kind} d{self.head_dim} {mask} b{self.batch} {s} h{self.nheads}/{self.nheads_kv}"

    def seqlens(self) -> list[int]:
        """Per-sequence lengths: the batch entries' lengths (varlen: a fixed spread between a
        quarter of the maximum and the maximum, the first one full)."""
        if not self.varlen:
            return [self.seqlen_q] * self.batch
        top = self.seqlen_q
        return [top] + [max(1, top * (2 + (3 * i) % 7) // 8) for i in range(1, self.batch)]

    @property
    def rows(self) -> int:
        """What the shape bucket counts as rows: the batch, or total query tokens for varlen."""
        return sum(self.seqlens()) if self.varlen else self.batch

    def flops(self) -> float:
        """Forward FLOPs (4 * sq * sk * heads * d per sequence; causal counts half)."""
        total = sum(n * (n if self.varlen else self.seqlen_k) for n in self.seqlens())
        f = 4.0 * total * self.nheads * self.head_dim
        return f / 2 if self.causal else f

    def case(self) -> dict[str, Any]:
        """The call as a case of :mod:`fa4aot.tools.fa4_calls` (what FA4's selection reads)."""
        c: dict[str, Any] = dict(
            batch=self.batch, seqlen_q=self.seqlen_q, seqlen_k=self.seqlen_k, nheads=self.nheads,
            nheads_kv=self.nheads_kv, head_dim=self.head_dim, head_dim_v=self.head_dim, causal=self.causal,
            dtype=self.dtype,
        )  # fmt: skip
        if self.varlen:
            c.update(varlen=True, total_q=sum(self.seqlens()), total_k=sum(self.seqlens()))
        return c

    def bucket(self) -> tuple[int, int, int, int]:
        return bucket(self.rows, self.nheads, self.seqlen_q, self.seqlen_k)

    def spec(self) -> str:
        """The ``--shapes`` form of this shape (``parse_shape(s.spec()) == s``)."""
        return (
            f"b={self.batch},sq={self.seqlen_q},sk={self.seqlen_k},h={self.nheads},hk={self.nheads_kv},"
            f"d={self.head_dim},causal={int(self.causal)},varlen={int(self.varlen)},dtype={self.dtype}"
        )


def parse_shape(spec: str) -> TuneShape:
    """``b=16,s=2048,h=32,hk=8,d=128,causal=1,varlen=0`` (``s`` sets sq and sk; dtype=fp16)."""
    kw: dict[str, Any] = {}
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep:
            raise Fa4aotError(f"shape {spec!r}: {part!r} is not key=value")
        if k in ("causal", "varlen"):
            if v not in ("0", "1"):
                raise Fa4aotError(f"shape {spec!r}: {k} must be 0 or 1")
            kw[k] = v == "1"
        elif k == "dtype":
            kw["dtype"] = v
        elif k == "s" or k in _KEYS:
            try:
                n = int(v)
            except ValueError:
                raise Fa4aotError(f"shape {spec!r}: {k} must be an integer, got {v!r}") from None
            if k == "s":
                kw["seqlen_q"] = kw["seqlen_k"] = n
            else:
                kw[_KEYS[k]] = n
        else:
            raise Fa4aotError(f"shape {spec!r}: unknown key {k!r} (b, s, sq, sk, h, hk, d, causal, varlen, dtype)")
    missing = [k for k in ("batch", "seqlen_q", "seqlen_k", "nheads", "head_dim") if k not in kw]
    if missing:
        raise Fa4aotError(f"shape {spec!r}: missing {', '.join(missing)}")
    kw.setdefault("nheads_kv", kw["nheads"])
    return TuneShape(**kw)


def _sweep24() -> tuple[TuneShape, ...]:
    shapes = []
    for d in (64, 128):
        for causal in (False, True):
            for b, s, h, hk in ((32, 512, 16, 16), (16, 2048, 32, 8), (4, 8192, 32, 4), (1, 16384, 16, 16)):
                shapes.append(TuneShape(b, s, s, h, hk, d, causal))
            for b, s, h, hk in ((8, 2048, 32, 8), (4, 8192, 16, 16)):
                shapes.append(TuneShape(b, s, s, h, hk, d, causal, varlen=True))
    return tuple(shapes)


#: The 24-shape H100 sweep: dense and varlen, d64 and d128, causal and not, GQA 1/4/8, 512-16k.
SWEEP24 = _sweep24()


def parse_shapes(spec: str) -> tuple[TuneShape, ...]:
    """``sweep24``, a file with one shape spec per line (# comments), or specs separated by ``;``."""
    if spec == "sweep24":
        return SWEEP24
    path = Path(spec)
    if path.is_file():
        lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    else:
        lines = [s.strip() for s in spec.split(";")]
    shapes = tuple(parse_shape(ln) for ln in lines if ln)
    if not shapes:
        raise Fa4aotError(f"--shapes {spec!r} names no shape")
    return shapes


def default_variant(shape: TuneShape, target: Target) -> Variant:
    """The forward variant FA4's dispatch runs for ``shape``."""
    d = decide(target.arch, target.num_sms, shape.case())
    return Variant.make(FORWARD_FAMILY[target.arch], target.arch, target.num_sms, **d.fields)


def candidates(default: Variant, pool: Iterable[Variant]) -> list[Variant]:
    """Variants of ``pool`` that may replace ``default`` (same family and target, differing only
    in tunable fields), default excluded, in a stable order."""
    out = []
    seen = {default.variant_id}
    for v in pool:
        if v.family != default.family or (v.arch, v.num_sms) != (default.arch, default.num_sms):
            continue
        if v.variant_id in seen or result_class_difference(v.family, default.fields, v.fields) is not None:
            continue
        seen.add(v.variant_id)
        out.append(v)
    return sorted(out, key=lambda v: v.label())


def spread(samples: list[float]) -> float:
    """Relative inter-quartile range of timing samples."""
    if len(samples) < 4:
        return 0.0
    q = statistics.quantiles(samples, n=4)
    return (q[2] - q[0]) / statistics.median(samples)


def pick_winner(times: dict[str, list[float]], default_id: str) -> tuple[str, float]:
    """(winning variant id, the noise it had to beat). The default wins unless another
    candidate's median beats it by more than the noise."""
    med = {k: statistics.median(v) for k, v in times.items()}
    best = min(med, key=lambda k: (med[k], k != default_id))
    noise = max(MIN_GAIN, spread(times[default_id]), spread(times[best]))
    if best != default_id and med[best] < med[default_id] * (1 - noise):
        return best, noise
    return default_id, noise


def write_table(cache_root: Path, table: TuningTable, also: Path | None = None) -> Path:
    """Store ``table`` in the cache (atomically: a reader sees the old table or the new one,
    never part of one) and optionally copy it to ``also``."""
    d = cache_root / "tuning"
    d.mkdir(exist_ok=True)
    path = d / table_filename(table.arch, table.num_sms, table.device_name)
    data = table.to_bytes()
    for dest in [path] + ([also] if also else []):
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


# -- measuring (torch + a CUDA GPU) ------------------------------------------------------------


class ShapeRun:
    """Tensors and a callable running one shape through the runtime with a chosen variant."""

    def __init__(self, rt: Any, shape: TuneShape, default_id: str, seed: int = 0):
        import torch

        import fa4aot

        self.rt, self.shape = rt, shape
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[shape.dtype]
        g = torch.Generator(device="cuda").manual_seed(seed)
        lens = shape.seqlens()
        hd = shape.head_dim
        if shape.varlen:
            tq = sum(lens)
            self.q = torch.randn(tq, shape.nheads, hd, device="cuda", dtype=dt, generator=g)
            self.k = torch.randn(tq, shape.nheads_kv, hd, device="cuda", dtype=dt, generator=g)
            cu = torch.tensor([0] + list(_cumsum(lens)), dtype=torch.int32, device="cuda")
            self.cu = cu
        else:
            self.q = torch.randn(shape.batch, shape.seqlen_q, shape.nheads, hd, device="cuda", dtype=dt, generator=g)
            self.k = torch.randn(shape.batch, shape.seqlen_k, shape.nheads_kv, hd, device="cuda", dtype=dt, generator=g)
        self.v = torch.randn_like(self.k)
        self.out = torch.empty_like(self.q)
        if shape.varlen:
            mx = max(lens)
            self.fn: Callable[[], Any] = lambda: fa4aot.flash_attn_varlen_func(
                self.q,
                self.k,
                self.v,
                cu_seqlens_q=self.cu,
                cu_seqlens_k=self.cu,
                max_seqlen_q=mx,
                max_seqlen_k=mx,
                causal=shape.causal,
                out=self.out,
                runtime=rt,
            )
        else:
            self.fn = lambda: fa4aot.flash_attn_func(
                self.q, self.k, self.v, causal=shape.causal, out=self.out, runtime=rt
            )
        self.default_id = default_id
        self.default_lv = rt._load_id(default_id)
        self.bucket = shape.bucket()

    def select(self, variant_id: str) -> None:
        """Route this shape's calls to ``variant_id`` (the runtime's own tuned path)."""
        self.default_lv.tuned = None if variant_id == self.default_id else {self.bucket: variant_id}


def _cumsum(xs: list[int]) -> Iterable[int]:
    t = 0
    for x in xs:
        t += x
        yield t


def measure(
    run: ShapeRun, ids: list[str], rounds: int, reps: int, flush_bytes: int, seed: int = 0
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per variant: milliseconds of single calls (rounds x reps samples, interleaved, L2 flushed
    before each) and the largest absolute difference of its output from the default's."""
    import torch

    flush = torch.empty(flush_bytes // 4, dtype=torch.int32, device="cuda")
    rng = random.Random(seed)
    times: dict[str, list[float]] = {i: [] for i in ids}
    diffs: dict[str, float] = {}
    ref = None
    for vid in ids:  # load, warm up and record each output once
        run.select(vid)
        run.fn()
        torch.cuda.synchronize()
        if ref is None:
            ref = run.out.float().clone()
        diffs[vid] = float((run.out.float() - ref).abs().max())
    for _ in range(rounds):
        order = list(ids)
        rng.shuffle(order)
        for vid in order:
            run.select(vid)
            events = []
            # queue the timed calls behind a busy kernel: host time never shows as GPU idle time
            torch.cuda._sleep(QUEUE_SLEEP_CYCLES)
            for _ in range(reps):
                flush.zero_()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                run.fn()
                b.record()
                events.append((a, b))
            torch.cuda.synchronize()
            times[vid].extend(a.elapsed_time(b) for a, b in events)
    run.select(run.default_id)
    return times, diffs


def tune(
    rt: Any,
    pool: list[Variant],
    shapes: Iterable[TuneShape],
    *,
    rounds: int = 7,
    reps: int = 3,
    flush_bytes: int = DEFAULT_FLUSH_BYTES,
    log: Callable[[str], None] = print,
) -> TuningTable:
    """Measure every shape's candidates on the current GPU; a table of the winners (every
    measured shape is kept in ``measured``)."""
    target = rt.target
    family = FORWARD_FAMILY[target.arch]
    if family not in TUNABLE_FIELDS:
        raise Fa4aotError(f"{family} has no tunable fields in this fa4aot")
    entries: dict[tuple, TuningEntry] = {}
    measured = []
    for shape in shapes:
        dv = default_variant(shape, target)
        if not rt.has(dv):
            log(f"skip {shape.label()}: the cache lacks FA4's own variant {dv.variant_id[:12]} ({dv.label()})")
            continue
        cands = [c for c in candidates(dv, pool) if rt.has(c)]
        ids = [dv.variant_id] + [c.variant_id for c in cands]
        run = ShapeRun(rt, shape, dv.variant_id)
        times, diffs = measure(run, ids, rounds, reps, flush_bytes)
        win, noise = pick_winner(times, dv.variant_id)
        med = {k: statistics.median(v) for k, v in times.items()}
        by_id = {c.variant_id: c for c in [dv] + cands}
        rows = []
        for vid in ids:
            f = by_id[vid].fields
            tunable = {k: f[k] for k in sorted(TUNABLE_FIELDS[family])}
            rows.append(
                {
                    "variant": vid,
                    "fields": tunable,
                    "ms": med[vid],
                    "spread": spread(times[vid]),
                    "max_abs_diff_vs_default": diffs[vid],
                }
            )
        tflops = shape.flops() / (med[win] * 1e-3) / 1e12
        measured.append(
            {
                "shape": shape.label(),
                "spec": shape.spec(),
                "bucket": list(run.bucket),
                "default": dv.variant_id,
                "winner": win,
                "noise": noise,
                "speedup": med[dv.variant_id] / med[win],
                "tflops": tflops,
                "candidates": rows,
            }
        )
        line = f"{shape.label():<44} default {med[dv.variant_id]:8.4f} ms"
        if win != dv.variant_id:
            w = by_id[win].fields
            line += f"  -> {w['tile_m']}x{w['tile_n']} pack_gqa={w['pack_gqa']} {med[win]:8.4f} ms ({med[dv.variant_id] / med[win]:.3f}x)"
            key = (dv.variant_id, run.bucket)
            old = entries.get(key)
            # two measured shapes in one bucket keep the winner with the larger gain
            if old is None or old.default_ms / old.choice_ms < med[dv.variant_id] / med[win]:
                cubins = tuple(rt.index.entry(v).cubin.sha256 for v in (dv.variant_id, win))
                entries[key] = TuningEntry(
                    dv.variant_id, run.bucket, win, med[dv.variant_id], med[win], noise, shape.spec(), cubins
                )
        else:
            line += f"  FA4's choice stands ({len(cands)} candidates, noise {noise:.1%})"
        log(line)
        del run
    return TuningTable(
        target.arch,
        target.num_sms,
        rt.info.name,
        tuple(entries.values()),
        tuple(measured),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        tool="fa4aot tune",
    )


def table_lines(table: TuningTable, labels: dict[str, str]) -> list[str]:
    """``show-tuning``'s lines for one table (after its header line): each entry's bucket, FA4's
    variant and the measured choice (named by ``labels``, variant id -> label), then every
    measured shape. Only entries are checked when a table is read; a measured row lacking a field
    (a hand-edited table) is shown as malformed, never a KeyError."""
    out = [f"  {len(table.entries)} entries (bucket ranges: {', '.join(BUCKET_AXES)})"]
    for e in table.entries:
        ranges = " ".join(f"{a}={lo}..{hi}" for a, (lo, hi) in zip(BUCKET_AXES, map(bucket_range, e.bucket)))
        missing = "" if e.choice in labels else "  [choice not in this cache: ignored]"
        gain = f"{e.default_ms / e.choice_ms:.3f}x" if e.choice_ms > 0 else "?x"
        out += [
            f"  {ranges}",
            f"    FA4    {e.default[:12]} {e.default_ms:8.4f} ms  {labels.get(e.default, '?')}",
            f"    tuned  {e.choice[:12]} {e.choice_ms:8.4f} ms  {labels.get(e.choice, '?')}"
            f"  ({gain}, noise {e.spread:.1%}, from {e.shape}){missing}",
        ]
    if table.measured:
        out.append(f"  measured shapes: {len(table.measured)}")
        out += [_measured_line(m) for m in table.measured]
    return out


def _measured_line(m: dict[str, Any]) -> str:
    """One measured shape of ``show-tuning`` (a row lacking or mistyping a field says so)."""
    try:
        speedup, tflops = float(m["speedup"]), float(m["tflops"])
        tag = "tuned" if m["winner"] != m["default"] else "FA4  "
        return f"    {tag} {speedup:.3f}x {tflops:6.1f} TFLOP/s  {str(m['shape'])[:MAX_SHAPE_CHARS]}"
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        return f"    malformed measured row ({type(e).__name__}: {str(e)[:MAX_SHAPE_CHARS]})"


def geomean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")
