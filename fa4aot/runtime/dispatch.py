"""Which forward variant FA4 would run for a call: FA4's own selector (``select_fwd_config``, from
the cache's copy of FA4's config.py) on the call's host facts, with the interface glue fa4aot
restates (:mod:`fa4aot.core.fa4_interface`).

:class:`ForwardRule` holds what depends only on a call's compile-time inputs (dtype, head dims,
GQA ratio, masks, varlen, paging, sink, softcap); the runtime keeps one per static configuration
in a bounded dict. Its :meth:`ForwardRule.decide` runs FA4's selection on the call's shapes, and
remembers the answer for the last shapes it saw (a bounded memo: a serving loop repeats shapes),
so a repeated shape costs a dict lookup and a new one FA4's selection (tens of microseconds).

Deviation from FA4, on purpose: above 256 varlen batches FA4's single-tile varlen scheduler gets
a precomputed batch-lookup table (two more helper kernels); fa4aot runs the same scheduler
without it (same results, slower batch lookup for very large batches).
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

from fa4aot.core import env, fwd
from fa4aot.core import fa4_interface as fi
from fa4aot.core.bounded import BoundedDict
from fa4aot.core.errors import ArgumentError, FA4RejectsError
from fa4aot.core.targets import ARCHES
from fa4aot.core.variant import FORWARD_FAMILY, Variant
from fa4aot.runtime import regions

#: Shapes a rule remembers its decision for (a model's calls repeat a handful of shapes; a
#: varying max_seqlen evicts the oldest).
MAX_RULE_SHAPES = 256


class StaticCall(NamedTuple):
    """The compile-time inputs of a forward call (``causal`` as given: FA4 resolves it with the
    window per call)."""

    arch: str
    num_sms: int
    dtype: str
    head_dim: int
    head_dim_v: int
    num_heads: int
    num_heads_kv: int
    causal: bool
    varlen_q: bool = False
    varlen_k: bool = False
    seqused_q: bool = False
    seqused_k: bool = False
    pack_gqa: bool | None = None
    has_lse: bool = False
    #: scheduler metadata passed: False, True (a prepare kernel's) or fa4_interface.UNPREPARED
    caller_metadata: bool | str = False
    paged: bool = False
    learnable_sink: str = "none"
    softcap: float = 0.0
    requires_grad: bool = False
    #: FA4's tile_mn, mma_pv_is_rs, intra_wg_overlap requests (None: FA4 decides)
    requests: tuple[Any, Any, Any] = (None, None, None)
    #: an explicit FwdConfig (FA4's ``config=``), validated by FA4 instead of selected
    config: Any = None
    #: FP8 descale layouts "q,k,v" and the MXFP8 path (FA4's ``scales=``; None: not given)
    descales: str | None = None
    mxfp8: str | None = None


class Shape(NamedTuple):
    """The per-call facts FA4's selection reads (see :class:`fa4aot.core.fa4_interface.FwdFacts`)."""

    batch: int
    total_q: int
    total_k: int
    q_capacity: int
    k_capacity: int
    max_seqlen_q: int | None
    max_seqlen_k: int | None
    window_left: int | None
    window_right: int | None
    page_size: int | None
    num_splits: int


class Pick(NamedTuple):
    """A decision as the runtime uses it: the loaded variant and FA4's plan around it."""

    lv: Any  # LoadedVariant
    plan: fi.FwdPlan
    config: Any


class ForwardRule:
    """FA4's forward decisions for one :class:`StaticCall` on one runtime."""

    __slots__ = ("s", "family", "sel", "knobs", "memo", "loaded", "regions")

    def __init__(self, s: StaticCall, sel: Any, knobs: fi.Knobs):
        self.s = s
        family = FORWARD_FAMILY.get(s.arch)
        if family is None:
            raise ArgumentError(f"fa4aot has no forward for {s.arch} (it builds {sorted(FORWARD_FAMILY)})")
        if s.num_heads_kv < 1 or s.num_heads % s.num_heads_kv:
            raise ArgumentError(f"nheads ({s.num_heads}) must be a multiple of the KV heads ({s.num_heads_kv})")
        if s.paged and s.varlen_k:
            raise ArgumentError("page_table cannot be used with cu_seqlens_k (FA4 indexes pages per batch entry)")
        self.family = family
        self.sel = sel
        self.knobs = knobs
        #: Shape -> Pick
        self.memo: BoundedDict = BoundedDict(MAX_RULE_SHAPES)
        #: variant fields (as a sorted tuple) -> LoadedVariant, so a config seen again loads nothing
        self.loaded: BoundedDict = BoundedDict(MAX_RULE_SHAPES)
        #: FA4's decisions by region of shapes (None: not traced - an explicit config, or disabled)
        self.regions: regions.Regions | None = None if s.config is not None or not REGIONS_ON else regions.Regions()

    def facts(self, shape: Shape) -> fi.FwdFacts:
        s = self.s
        return fi.FwdFacts(
            arch=fi.arch_number(s.arch),
            num_sms=s.num_sms,
            dtype=s.dtype,
            head_dim=s.head_dim,
            head_dim_v=s.head_dim_v,
            num_heads=s.num_heads,
            num_heads_kv=s.num_heads_kv,
            batch=shape.batch,
            total_q=shape.total_q,
            total_k=shape.total_k,
            q_capacity=shape.q_capacity,
            k_capacity=shape.k_capacity,
            max_seqlen_q=shape.max_seqlen_q,
            max_seqlen_k=shape.max_seqlen_k,
            causal=s.causal,
            window_left=shape.window_left,
            window_right=shape.window_right,
            varlen_q=s.varlen_q,
            varlen_k=s.varlen_k,
            seqused_q=s.seqused_q,
            seqused_k=s.seqused_k,
            page_size=shape.page_size,
            caller_metadata=bool(s.caller_metadata),
            caller_semaphore=s.caller_metadata is True,
            caller_prepared=s.caller_metadata is True,
            softcap=bool(s.softcap),
            learnable_sink=s.learnable_sink != "none",
            has_lse=s.has_lse,
            pack_gqa=s.pack_gqa,
            num_splits=shape.num_splits,
            requires_grad=s.requires_grad,
            requested_tile=s.requests[0],
            requested_mma_pv_is_rs=s.requests[1],
            requested_intra_wg_overlap=s.requests[2],
            descales=s.descales,
            mxfp8=s.mxfp8,
        )

    def decision(self, shape: Shape) -> fwd.Decision:
        """FA4's decision for ``shape`` (uncached); FA4's rejections become ArgumentError."""
        s = self.s
        try:
            return fwd.decide(self.sel, self.facts(shape), self.knobs, s.softcap, s.learnable_sink, s.config)
        except (ValueError, AssertionError) as e:
            fa4_asserts = isinstance(e, AssertionError) or head_dims_rejected(s.arch, s.head_dim, s.head_dim_v, s.dtype)
            raise (FA4RejectsError if fa4_asserts else ArgumentError)(f"FA4 rejects this call: {e}") from None

    def region(self, shape: Shape) -> Any:
        """The Pick of a traced region holding ``shape`` (None: none does)."""
        r = self.regions
        if r is None:
            return None
        return r.find(region_key(shape), tuple(v for v in shape[:_N_TRACED] if v is not None))

    def traced_decision(self, shape: Shape) -> tuple[fwd.Decision, Any] | None:
        """FA4's decision for ``shape`` and its region's (key, check), by tracing FA4's selection
        (:mod:`fa4aot.runtime.regions`); None where tracing does not apply or fails (the caller
        decides plainly, which also raises FA4's errors)."""
        r, sel, s = self.regions, self.sel, self.s
        if r is None or not r.enabled:
            return None
        select = getattr(sel.select_fwd_config, "__wrapped__", None)
        validate = sel.validate_fwd_config
        if select is None or not hasattr(validate, "__wrapped__"):
            r.enabled = False  # a selector without FA4's caches: nothing to bypass, trace nothing
            return None
        f = self.facts(shape)
        if fwd.call_problem(f) is not None:
            return None

        def run(facts: dict[str, Any]) -> Any:
            return fwd.select_and_plan(sel, self.facts(Shape(**facts)), self.knobs, select)

        # FA4's lru_cache'd validate_fwd_config would hash (pin) every traced number: the selector
        # module (the cache's private copy of FA4's config.py) calls the function it wraps instead
        with _TRACE_LOCK:
            sel.validate_fwd_config = validate.__wrapped__
            try:
                (config, plan), check = regions.trace(run, shape._asdict())
            except Exception:  # noqa: BLE001 - FA4's rejection or an untraceable step: decide plainly
                r.failed()
                return None
            finally:
                sel.validate_fwd_config = validate
        try:
            d = fwd.finish(f, config, None, plan, s.softcap, s.learnable_sink)
        except ValueError:
            return None
        return d, (region_key(shape), check)

    def variant(self, fields: dict[str, Any]) -> Variant:
        return Variant.make(self.family, self.s.arch, self.s.num_sms, **fields)


#: Shape's leading fields are regions.TRACED, in order; the rest key a region exactly.
_N_TRACED = len(regions.TRACED)
#: Tracing swaps the selector module's validate_fwd_config for the function it wraps.
_TRACE_LOCK = threading.Lock()
#: $FA4AOT_DECISION_REGIONS=0 turns region tracing off (every new shape decided plainly).
REGIONS_ON = env.decision_regions()


def region_key(shape: Shape) -> tuple[Any, ...]:
    """What a region must match exactly: the untraced facts and which traced ones are None."""
    return (*shape[_N_TRACED:], *(v is None for v in shape[:_N_TRACED]))


def head_dims_rejected(arch: str, head_dim: int, head_dim_v: int, dtype: str) -> str | None:
    """FA4's head-dim assertion for a forward on ``arch`` (fa4_interface.head_dims_problem), or None."""
    return fi.head_dims_problem(ARCHES[arch].compute_capability[0], head_dim, head_dim_v, dtype)


def decide(sel: Any, s: StaticCall, shape: Shape, knobs: fi.Knobs = fi.NO_KNOBS) -> fwd.Decision:
    """The decision for one call (uncached: for tests and tools)."""
    return ForwardRule(s, sel, knobs).decision(shape)
