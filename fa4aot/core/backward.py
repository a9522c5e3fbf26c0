"""FA4's backward pass (4.0.0b40) as fa4aot builds and runs it: FA4's own ``select_bwd_config``
picks the configuration (:mod:`fa4aot.core.selector`); this module turns a call and that config
into the kernels ``_flash_attn_bwd`` launches and the scratch it allocates, restating only what
``interface.py`` computes around the selector (each function names the lines it mirrors).

FA4's ``_flash_attn_bwd`` launches up to five kernels: the preprocess (dot(O, dO), LSE * log2(e),
zeroing the fp32 dQ accumulator), the main kernel (dK, dV, and dQ accumulated in fp32), and the
postprocess that converts the dQ accumulator (and, where several query heads share a KV head's
tile, the dK and dV accumulators) to bf16/fp16. A manifest group of ``bwd_sm90`` / ``bwd_sm100``
names the *call*; its expansion runs FA4's selector over the group's shapes (SM100's query-head
fold depends on them) and :func:`parts` turns each selected config into the kernel variants of the
call.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, NamedTuple

from fa4aot.core import fa4_interface as fi
from fa4aot.core.targets import ARCHES

#: The main-kernel family per arch (FA4: 9.x FlashAttentionBackwardSm90, 10.x / 11.x
#: FlashAttentionBackwardSm100, 12.x FlashAttentionBackwardSm120).
BACKWARD_FAMILY = {a.name: a.backward for a in ARCHES.values() if a.backward}
BACKWARD_FAMILIES = ("bwd_sm90", "bwd_sm100", "bwd_sm120")
#: Threads of one warp group (FA4's SM90 backward runs num_wg MMA warp groups plus one producer).
WARP_GROUP_THREADS = 128
#: Threads of FA4's SM100 postprocess (interface.py 2766-2768).
SM100_POST_THREADS = 128
#: Descriptors per CTA in the backward's tensor-map workspace (interface.py 2579: K, V, and on
#: SM100 the 2-CTA Kt); SM120's backward takes none.
BWD_WORKSPACE_DESCS = {"bwd_sm90": 2, "bwd_sm100": 3}

#: The call fields of a backward group (what the runtime computes from a call).
CALL_FIELDS = (
    *fi.ATTENTION_CALL_FIELDS,
    "deterministic",
    "softcap",
    "has_dlse",
    "learnable_sink",
)
#: ``BwdConfig`` fields that are no kernel's code (the arch says the family).
NOT_CODEGEN = ("device_capacity",)

#: The shape grid a backward group expands over (SM100's query-head fold reads batch, sequence
#: lengths and the SM count).
DEFAULT_BATCH = (1, 4, 16, 64)
DEFAULT_SEQLEN = (128, 1024, 4096, 16384)
DEFAULT_NHEADS_KV = (1, 4, 8, 32)


def check_call(family: str, f: dict[str, Any]) -> str | None:
    """Why FA4's backward on this arch family cannot run this call (None: it can): the head-dim
    limits its interface checks and the combinations fa4aot refuses."""
    hd, hdv, qh = f["head_dim"], f["head_dim_v"], f["qhead_per_kvhead"]
    if qh < 1:
        return "qhead_per_kvhead must be >= 1"
    if f["causal"] and f["local"]:
        return "causal and local are exclusive (FA4 resolves a causal window to causal)"
    if family == "bwd_sm90":
        return fi.head_dims_problem(9, hd, hdv, f["dtype"])
    if family == "bwd_sm100":
        return fi.head_dims_problem(10, hd, hdv, f["dtype"])
    if family == "bwd_sm120":  # no head-dim check in FA4's interface on SM120 (interface.py 2316)
        if f["deterministic"]:
            return "FA4's SM120 backward is not deterministic (interface.py 2159)"
        if f["learnable_sink"] != "none":
            return "FA4's SM120 backward takes no learnable sink (interface.py 2132)"
        return None
    return f"unknown backward family {family!r}"


#: torch dtype names (``str(t.dtype)`` without ``torch.``) -> fa4aot's
_TORCH_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def fa4_call_fields(a: dict[str, Any]) -> dict[str, Any]:
    """The call fields (:data:`CALL_FIELDS`) of a call of FA4's ``_flash_attn_bwd``, from its
    bound arguments (tensors with ``dtype`` and ``shape``, as torch's): the group fa4aot's
    runtime asks for to serve that call (fa4aot/runtime/backward.py: ``flash_attn_backward``'s
    dispatch key). ``fa4aot record`` learns backward groups with it."""
    q, v = a["q"], a["v"]
    wl, wr = a.get("window_size_left"), a.get("window_size_right")
    if wl is None and wr is None:
        causal, local = bool(a.get("causal")), False
    else:
        causal, local, _, _ = fi.resolve_window(bool(a.get("causal")), wl, wr)
    sink = a.get("learnable_sink")

    def dtype(t: Any) -> str:
        name = str(t.dtype).removeprefix("torch.")
        return _TORCH_DTYPES.get(name, name)

    key = (
        dtype(q), int(q.shape[-1]), int(v.shape[-1]), int(q.shape[-2]) // int(v.shape[-2]), causal, local,
        a.get("cu_seqlens_q") is not None, a.get("cu_seqlens_k") is not None, a.get("seqused_q") is not None,
        a.get("seqused_k") is not None, bool(a.get("deterministic")), float(a.get("softcap") or 0.0),
        a.get("dlse") is not None, dtype(sink) if sink is not None else "none",
    )  # fmt: skip
    return dict(zip(CALL_FIELDS, key))


class BwdFacts(NamedTuple):
    """The host facts ``_flash_attn_bwd`` reads from a call for its config selection."""

    arch: int
    num_sms: int
    dtype: str
    head_dim: int
    head_dim_v: int
    num_heads: int
    num_heads_kv: int
    batch: int
    total_q: int
    total_k: int
    max_seqlen_q: int | None  # the caller's host bound (varlen), or None
    max_seqlen_k: int | None
    varlen_q: bool
    varlen_k: bool
    causal: bool  # resolved with the window
    local: bool
    deterministic: bool = False
    softcap: bool = False
    learnable_sink: bool = False


class BwdKnobs(NamedTuple):
    """FA4's backward environment knobs (``utils._get_bwd_tile_n_override``,
    ``_get_bwd_pack_gqa_override``, ``_get_bwd_head_loop_override``, ``_get_disable_2cta_default``)."""

    tile_n: int | None = None
    pack_gqa: int | None = None
    head_loop: bool | None = None
    disable_2cta: bool = False


NO_BWD_KNOBS = BwdKnobs()


def bwd_knobs_from_env(environ: Any) -> BwdKnobs:
    """The knobs as FA4 reads them (FLASH_ATTENTION_BWD_TILE_N, FLASH_ATTENTION_BWD_PACK_GQA,
    FLASH_ATTENTION_BWD_HEAD_LOOP, FA_DISABLE_2CTA); a bad value raises ValueError as FA4 does."""

    def choice(name: str, choices: tuple[int, ...]) -> int | None:
        value = environ.get(name)
        if value in (None, "", "auto"):
            return None
        if not value.isdigit() or int(value) not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(str, choices))} or auto, got {value}")
        return int(value)

    tile_n = environ.get("FLASH_ATTENTION_BWD_TILE_N")
    if tile_n not in (None, "") and tile_n not in ("64", "128"):
        raise ValueError(f"FLASH_ATTENTION_BWD_TILE_N must be 64 or 128, got {tile_n}")
    loop = choice("FLASH_ATTENTION_BWD_HEAD_LOOP", (0, 1))
    return BwdKnobs(
        int(tile_n) if tile_n else None,
        choice("FLASH_ATTENTION_BWD_PACK_GQA", (0, 1, 2, 4)),
        None if loop is None else loop == 1,
        environ.get("FA_DISABLE_2CTA", "0") == "1",
    )


def bwd_inputs(sel: Any, f: BwdFacts, knobs: BwdKnobs = NO_BWD_KNOBS) -> Any:
    """``BwdHeuristicInputs`` as ``_flash_attn_bwd`` builds them (interface.py 2178-2196 with
    ``_get_bwd_inputs`` 2036-2066): a varlen length without a host bound is the mean; the SM
    count only where the fold chooser reads it."""

    def heuristic_seqlen(seqlen: int | None, total: int) -> int:
        if seqlen is None:
            return max(1, -(-total // max(f.batch, 1)))
        return seqlen

    inputs = sel.BwdHeuristicInputs(
        **fi.problem_inputs(f),
        max_seqlen_q=heuristic_seqlen(f.max_seqlen_q, f.total_q) if f.varlen_q else f.total_q // max(f.batch, 1),
        max_seqlen_k=heuristic_seqlen(f.max_seqlen_k, f.total_k) if f.varlen_k else f.total_k // max(f.batch, 1),
        has_cu_seqlens=f.varlen_q or f.varlen_k,
        causal=f.causal,
        local=f.local,
        deterministic=f.deterministic,
        has_softcap=f.softcap,
        has_learnable_sink=f.learnable_sink,
        requested_tile_n=knobs.tile_n,
        requested_pack_gqa=knobs.pack_gqa,
        requested_head_loop=knobs.head_loop,
        disable_2cta=knobs.disable_2cta,
    )
    if sel.bwd_selection_reads_num_sms(inputs):
        inputs = inputs._replace(num_sms=f.num_sms)
    return inputs


def config_fields(config: Any) -> dict[str, Any]:
    """The variant fields of a selected ``BwdConfig`` (every field, FA4's names; registers as
    ``regs_<role>`` ints)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        name = field.name
        if name in NOT_CODEGEN:
            continue
        value = getattr(config, name)
        if name == "registers":
            if value is not None:
                out.update({f"regs_{k}": v for k, v in dataclasses.asdict(value).items()})
            continue
        out[name] = value
    return out


def config_from_fields(sel: Any, fields: dict[str, Any], arch: str) -> Any:
    """The ``BwdConfig`` a main backward variant's fields stand for (for the kernel constructor)."""
    names = {f.name for f in dataclasses.fields(sel.BwdConfig)}
    kw = {k: v for k, v in fields.items() if k in names and k != "registers"}
    regs = {k[5:]: v for k, v in fields.items() if k.startswith("regs_")}
    major = fi.arch_number(arch) // 10
    cls = sel.Sm90BwdRegisters if major == 9 else sel.Sm100BwdRegisters
    return sel.BwdConfig(device_capacity=major, registers=cls(**regs) if regs else None, **kw)


class Part(NamedTuple):
    """One kernel of a backward call: its family, compile-time fields and role."""

    role: str  # main, pre, post_dq, post_dk, post_dv
    family: str
    fields: tuple[tuple[str, Any], ...]

    @property
    def field_dict(self) -> dict[str, Any]:
        return dict(self.fields)


def _part(role: str, family: str, **fields: Any) -> Part:
    return Part(role, family, tuple(sorted(fields.items())))


def accum_orders(family: str, use_2cta: bool, tile_n: int) -> tuple[str, str]:
    """(dQ, dK/dV) accumulate tile orders (``FlashAttentionBackwardSm100.accum_tile_orders``,
    flash_bwd_sm100.py 492-504; SM90: none)."""
    if family != "bwd_sm100":
        return "none", "none"
    dq = "TMEM_FRAG_2CTA" if use_2cta else "TMEM_FRAG_1CTA"
    return dq, "ROW_MAJOR" if use_2cta and tile_n == 64 else "TMEM_FRAG_1CTA"


def hdim_multiple_of(main: dict[str, Any]) -> int:
    """Accumulators padded to multiples of 64 of the head dim with SM90's dKV_swapAB, else 32
    (interface.py 2357)."""
    return 64 if main["dKV_swapAB"] else 32


def dkv_postprocess(main: dict[str, Any]) -> bool:
    """Several query heads accumulate into one dK/dV: fp32 accumulators and their postprocess
    (interface.py 2385)."""
    return main["qhead_per_kvhead"] // main["pack_factor"] > 1 and not main["head_loop"]


def parts(family: str, call: dict[str, Any], config: dict[str, Any], num_heads: int) -> tuple[Part, ...]:
    """The kernels FA4's ``_flash_attn_bwd`` launches for a call (fields ``call``, CALL_FIELDS) with
    the selected config (``config``: :func:`config_fields`), in launch order: preprocess, main, dQ
    postprocess and, with dK/dV accumulators, the dK and dV postprocesses. ``num_heads``: the
    call's query heads (a query-head fold specializes the preprocess on its scratch heads)."""
    hd, hdv = call["head_dim"], call["head_dim_v"]
    main_fields = {k: call[k] for k in CALL_FIELDS if k not in ("has_dlse", "learnable_sink")}
    main_fields["softcap"] = float(main_fields["softcap"])
    main_fields.update(config)
    mult = hdim_multiple_of(main_fields)
    pack = config["pack_factor"]
    dq_order, dkv_order = accum_orders(family, config["use_2cta_instrs"], config["tile_n"])
    if family == "bwd_sm90":
        num_wg = config["num_threads"] // WARP_GROUP_THREADS - 1
        dq_threads = WARP_GROUP_THREADS if config["dQ_single_wg"] else num_wg * WARP_GROUP_THREADS
        dkv_threads = num_wg * WARP_GROUP_THREADS
    else:
        dq_threads = dkv_threads = SM100_POST_THREADS

    def post(role: str, head_dim: int, side: str, **rest: Any) -> Any:
        """A postprocess: dQ's reads the Q side's tile, atoms and lengths, dK's / dV's the K side's."""
        q = side == "q"
        return _part(
            role, "bwd_post", dtype=call["dtype"], head_dim=head_dim, tile=config["tile_m" if q else "tile_n"],
            atom_layout=config["AtomLayoutMdQ" if q else "AtomLayoutNdKV"],
            swap_ab=config["dQ_swapAB" if q else "dKV_swapAB"], varlen=call[f"varlen_{side}"],
            seqused=call[f"seqused_{side}"], hdim_multiple_of=mult, **rest,
        )  # fmt: skip

    out = [
        _part(
            "pre",
            "bwd_pre",
            dtype=call["dtype"],
            head_dim=hd,
            head_dim_v=hdv,
            tile_m=config["tile_m"],
            varlen_q=call["varlen_q"],
            seqused_q=call["seqused_q"],
            has_dlse=call["has_dlse"],
            hdim_multiple_of=mult,
            pack_factor=pack,
            scratch_heads=num_heads // pack if pack > 1 else 1,
        ),
        _part("main", family, **main_fields),
        post(
            "post_dq",
            hd,
            "q",
            num_threads=dq_threads,
            two_cta=config["use_2cta_instrs"],
            cluster_size=1,
            accum_order=dq_order,
            learnable_sink=call["learnable_sink"],
            pack_factor=pack,
        ),
    ]
    if dkv_postprocess(main_fields):
        for role, dim in (("post_dk", hd), ("post_dv", hdv)):
            out.append(
                post(
                    role,
                    dim,
                    "k",
                    num_threads=dkv_threads,
                    two_cta=False,
                    cluster_size=config["cluster_size"],
                    accum_order=dkv_order,
                    learnable_sink="none",
                    pack_factor=1,
                )
            )
    return tuple(out)


def facts_for(
    arch: str, num_sms: int, call: dict[str, Any], batch: int, seqlen_q: int, seqlen_k: int, nheads_kv: int
) -> BwdFacts:
    """The facts of a call of class ``call`` (CALL_FIELDS) with full sequences of these lengths
    (varlen sides give them as host bounds)."""
    qh = call["qhead_per_kvhead"]
    return BwdFacts(
        fi.arch_number(arch), num_sms, call["dtype"], call["head_dim"], call["head_dim_v"], nheads_kv * qh, nheads_kv,
        batch, batch * seqlen_q, batch * seqlen_k, seqlen_q if call["varlen_q"] else None,
        seqlen_k if call["varlen_k"] else None, call["varlen_q"], call["varlen_k"], call["causal"], call["local"],
        call["deterministic"], bool(call["softcap"]), call["learnable_sink"] != "none",
    )  # fmt: skip


def sm120_problem(f: dict[str, Any], config: dict[str, Any]) -> str | None:
    """Why FA4's SM120 backward cannot compile the selected config (None: it can):
    ``FlashAttentionBackwardSm120.can_implement`` (flash_bwd_sm120.py 16-55: head dims multiples
    of 8; Q, dO, K and V tiles within SM120's shared memory), which FA4's interface does not check
    before it compiles (interface.py 2708, "TODO: check @can_implement")."""
    hd, hdv, tm, tn = f["head_dim"], f["head_dim_v"], config["tile_m"], config["tile_n"]
    if hd % 8 or hdv % 8:
        return "head dims must be multiples of 8 (FlashAttentionBackwardSm120.can_implement)"
    q, v = tm * hd * config["num_stages_Q"] * 2, tn * hdv * 2
    smem = (max(q, v) if config["V_in_regs"] else q + v) + tm * hdv * config["num_stages_dO"] * 2 + tn * hd * 2
    if smem > fi.SM120_SMEM_CAPACITY:
        return (
            f"(head_dim, head_dim_v)=({hd}, {hdv}) is not supported by FA4's SM120 backward: its {tm}x{tn} "
            f"tiles need {smem} bytes of shared memory, more than SM120's {fi.SM120_SMEM_CAPACITY}"
        )
    return None


def select(sel: Any, family: str, call: dict[str, Any], f: BwdFacts, knobs: BwdKnobs = NO_BWD_KNOBS):
    """(config fields, parts) of FA4's backward for a call; FA4's rejection raises ValueError."""
    config = sel.select_bwd_config(bwd_inputs(sel, f, knobs))
    fields = config_fields(config)
    if family == "bwd_sm120" and (why := sm120_problem(call, fields)):
        raise ValueError(why)
    return fields, parts(family, call, fields, f.num_heads)


def expand(
    sel: Any, family: str, arch: str, num_sms: int, call: dict[str, Any], domain: dict[str, tuple] | None = None
):
    """Every set of kernels FA4 selects for the call class ``call`` over ``domain`` (batch,
    seqlen_q, seqlen_k, nheads_kv tuples; default: a grid): a list of parts tuples (distinct), or
    ([], why). Memoised per process, like the forward's expansion."""
    key = (id(sel), family, arch, num_sms, tuple(sorted(call.items())), tuple(sorted((domain or {}).items())))
    hit = _EXPANDED.get(key)
    if hit is None:
        hit = _expand(sel, family, arch, num_sms, call, domain)
        if len(_EXPANDED) >= MAX_EXPANDED:
            _EXPANDED.pop(next(iter(_EXPANDED)))
        _EXPANDED[key] = hit
    return list(hit[0]), hit[1]


#: Expansions kept per process (parts tuples are immutable, so hits are shared).
MAX_EXPANDED = 1024
_EXPANDED: dict[tuple, tuple[list[tuple[Part, ...]], str | None]] = {}


def _expand(sel: Any, family: str, arch: str, num_sms: int, call: dict[str, Any], domain: dict[str, tuple] | None):
    d = domain or {}
    grid = (
        d.get("batch", DEFAULT_BATCH),
        d.get("seqlen_q", DEFAULT_SEQLEN),
        d.get("seqlen_k", DEFAULT_SEQLEN),
        d.get("nheads_kv", DEFAULT_NHEADS_KV),
    )
    seen: dict[tuple, tuple[Part, ...]] = {}
    why = None
    for b, sq, sk, hk in itertools.product(*grid):
        try:
            _, ps = select(sel, family, call, facts_for(arch, num_sms, call, b, sq, sk, hk))
        except (ValueError, AssertionError) as e:
            why = why or f"FA4 rejects it: {e}"
            continue
        seen.setdefault(tuple(p.fields for p in ps), ps)
    return list(seen.values()), why


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


class Scratch(NamedTuple):
    """Shapes of the buffers FA4's ``_flash_attn_bwd`` allocates for one call (interface.py
    2357-2438): per scratch head (query heads / pack_factor) the dpsum / lse_log2 rows and the dQ
    accumulator; the dK/dV accumulators; the deterministic semaphores."""

    scratch: tuple[int, ...]  # dpsum and lse_log2
    dq_accum: tuple[int, ...]
    dk_accum: tuple[int, ...] | None
    dv_accum: tuple[int, ...] | None
    dq_semaphore: tuple[int, ...] | None
    dk_semaphore: tuple[int, ...] | None  # dV's has the same shape
    workspace: tuple[int, ...] | None  # the tensor-map workspace (int64)


def scratch(
    family: str,
    main: dict[str, Any],
    batch: int,
    num_heads: int,
    num_heads_kv: int,
    seqlen_q: int,
    seqlen_k: int,
    total_q: int | None,
    total_k: int | None,
    num_sms: int,
) -> Scratch:
    """FA4's scratch for a call of the main kernel ``main`` (its fields): ``seqlen_q`` /
    ``seqlen_k`` the (longest) sequence lengths, ``total_*`` the packed totals of varlen sides."""
    tm, tn, cluster, pack = main["tile_m"], main["tile_n"], main["cluster_size"], main["pack_factor"]
    mult = hdim_multiple_of(main)
    hd_r, hdv_r = round_up(main["head_dim"], mult), round_up(main["head_dim_v"], mult)
    q_rows_r = round_up(seqlen_q * pack, tm)
    k_r = round_up(seqlen_k, tn)
    if cluster == 2 and (k_r // tn) % cluster:
        k_r += tn
    heads = num_heads // pack
    if total_q is not None:
        rows = (total_q * pack + (batch + 1) * tm - 1) // tm * tm
        sc: tuple[int, ...] = (heads, rows)
    else:
        sc = (batch, heads, q_rows_r)
    dq = (*sc[:-1], sc[-1] * hd_r)
    dk = dv = None
    if dkv_postprocess(main):
        if total_k is None:
            dk, dv = (batch, num_heads_kv, k_r * hd_r), (batch, num_heads_kv, k_r * hdv_r)
        else:
            ct = cluster * tn
            k_rows = (total_k + (batch + 1) * ct - 1) // ct * ct
            dk, dv = (num_heads_kv, k_rows * hd_r), (num_heads_kv, k_rows * hdv_r)
    dq_sem = dk_sem = None
    if main["deterministic"]:
        dq_sem = (batch, heads, q_rows_r // tm, cluster)
        if dk is not None:
            dk_sem = (batch, num_heads_kv, k_r // tn, 2)
    ws = None
    if family in BWD_WORKSPACE_DESCS and (main["varlen_k"] or main["seqused_k"]):
        tk = total_k if total_k is not None else batch * seqlen_k
        n_blocks = tk // tn + 2 * batch + 1
        ws = (max(n_blocks * num_heads * 2, 2 * num_sms) + 8, BWD_WORKSPACE_DESCS[family], fi.TENSORMAP_WORDS)
    return Scratch(sc, dq, dk, dv, dq_sem, dk_sem, ws)
