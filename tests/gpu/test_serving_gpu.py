"""Serving-engine forward on a real H100/H200 (the manifests/h100.yaml cache): paged KV with a
random permutation of pages (TMA page 128, cp.async page 16), seqused_k, GQA 8, decode and
chunked prefill; learnable sinks with and without a sliding window; softcap. Each is checked
against a float32 reference with FA4's tolerance rule and, where FA4 itself is importable (its
JIT stack, see ../shared/device-fa4-on-h100.md), for bitwise equality with FA4's own output."""

from __future__ import annotations

import functools
import math

import pytest

torch = pytest.importorskip("torch")

from torch_helpers import cu_seqlens, upcast_gqa  # noqa: E402

import fa4aot  # noqa: E402
import fa4aot.interface as fi  # noqa: E402

BF16 = torch.bfloat16


def reference(qs, ks, vs, *, causal=False, window=(None, None), sink=None, softcap=0.0, scale=None, upcast=True):
    """Per-sequence attention, concatenated over the batch: qs[i] (sq_i, h, d), ks[i]/vs[i]
    (sk_i, hk, d). Windows and causal masks are bottom-right aligned (FA's convention); the sink
    is one extra logit per head in natural-log units with no value; softcap maps a scaled score
    s to softcap * tanh(s / softcap) (FA4's score_mod). Returns (out (total_q, h, dv), lse (h, total_q))."""
    outs, lses = [], []
    for q, k, v in zip(qs, ks, vs):
        dtype = q.dtype
        q, k, v = upcast_gqa(q, k, v, upcast, heads_dim=1)
        h = q.shape[1]
        sc = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        s = torch.einsum("qhd,khd->hqk", q, k).float() * sc
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        sq, sk = q.shape[0], k.shape[0]
        qi = torch.arange(sq, device=q.device)[:, None] + sk - sq
        ki = torch.arange(sk, device=q.device)[None, :]
        wl, wr = window
        if causal:
            wr = 0
        masked = torch.zeros(sq, sk, dtype=torch.bool, device=q.device)
        if wr is not None:
            masked |= ki > qi + wr
        if wl is not None:
            masked |= ki < qi - wl
        s = s.masked_fill(masked, float("-inf"))
        if sink is not None:
            s = torch.cat([s, sink.float()[:, None, None].expand(h, sq, 1)], dim=-1)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
        if sink is not None:
            p = p[..., :-1]
        o = torch.einsum("hqk,khd->qhd", p.to(v.dtype), v)
        outs.append(o.to(torch.float32 if upcast else dtype))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=-1)


def check(out, lse, qs, ks, vs, **kw):
    """FA4's test rule: |out - ref| <= 2 |ref_lowprec - ref| + 2 * (rounding of ref)."""
    ref32, ref_lse = reference(qs, ks, vs, **kw)
    ref = ref32.to(out.dtype)
    ref_lo, _ = reference(qs, ks, vs, upcast=False, **kw)
    err = (out.float() - ref.float()).abs().max().item()
    err_lo = (ref_lo.float() - ref.float()).abs().max().item()
    atol = 2 * (ref.float() + 0.3 - 0.3 - ref.float()).abs().max().item()
    assert err <= 2 * err_lo + atol, f"max error {err:.3g}; bf16 reference {err_lo:.3g}, slack {atol:.3g}"
    if lse is not None:
        finite = ref_lse.isfinite()
        assert torch.equal(lse.isfinite(), finite)
        assert (lse[finite] - ref_lse[finite]).abs().max().item() < 2e-3


class Paged:
    """A KV cache of ``num_pages`` pages of ``page_size`` tokens, handed out to each sequence in a
    random order (a random permutation of the pool), plus the per-sequence views for the reference."""

    def __init__(self, g, lens_k, hk, d, page_size, spare_pages=5):
        self.page_size = page_size
        per_seq = [max(1, -(-n // page_size)) for n in lens_k]
        self.max_pages = max(per_seq)
        num_pages = sum(per_seq) + spare_pages
        self.k = torch.randn(num_pages, page_size, hk, d, device="cuda", dtype=BF16, generator=g)
        self.v = torch.randn(num_pages, page_size, hk, d, device="cuda", dtype=BF16, generator=g)
        perm = torch.randperm(num_pages, device="cuda", generator=g).to(torch.int32)
        table = torch.zeros(len(lens_k), self.max_pages, dtype=torch.int32, device="cuda")
        at = 0
        for i, n in enumerate(per_seq):
            table[i, :n] = perm[at : at + n]
            at += n
        self.table = table
        self.seqused = torch.tensor(lens_k, dtype=torch.int32, device="cuda")
        self.ks = [self.k[table[i, :n].long()].flatten(0, 1)[:sk] for i, (n, sk) in enumerate(zip(per_seq, lens_k))]
        self.vs = [self.v[table[i, :n].long()].flatten(0, 1)[:sk] for i, (n, sk) in enumerate(zip(per_seq, lens_k))]


def _fa4():
    """FA4's own interface, or skip (it needs the CUTLASS DSL JIT stack)."""
    return pytest.importorskip("flash_attn.cute.interface", reason="FA4's JIT stack is not installed here")


# --- paged KV --------------------------------------------------------------------------------

PHASES = {
    "decode": ([1, 1, 1, 1, 1, 1], [1, 700, 129, 2048, 64, 1000]),
    "chunked-prefill": ([77, 1, 300, 128, 5], [77, 900, 1100, 128, 4000]),
}


def _paged_case(phase, page_size, seed):
    lens_q, lens_k = PHASES[phase]
    h, hk, d = 64, 8, 128  # GQA 8
    g = torch.Generator(device="cuda").manual_seed(seed)
    pg = Paged(g, lens_k, hk, d, page_size)
    q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=BF16, generator=g)
    return lens_q, lens_k, pg, q


@pytest.mark.parametrize("page_size", [128, 16])
@pytest.mark.parametrize("phase", list(PHASES))
def test_paged_kv_matches_reference(runtime, phase, page_size):
    lens_q, lens_k, pg, q = _paged_case(phase, page_size, seed=page_size + len(phase))
    out, lse = fa4aot.flash_attn_varlen_func(
        q, pg.k, pg.v, cu_seqlens_q=cu_seqlens(lens_q), max_seqlen_q=max(lens_q), seqused_k=pg.seqused,
        page_table=pg.table, causal=True, return_lse=True, runtime=runtime,
    )  # fmt: skip
    torch.cuda.synchronize()
    check(out, lse, list(q.split(lens_q)), pg.ks, pg.vs, causal=True)


@pytest.mark.parametrize("page_size", [128, 16])
def test_batched_paged_decode_matches_reference(runtime, page_size):
    """q (batch, 1, h, d) with a paged cache and seqused_k (the decode-kvcache layout)."""
    lens_k = [3000, 1, 128, 129, 2500, 17, 640, 4096]
    h, hk, d = 32, 4, 128
    g = torch.Generator(device="cuda").manual_seed(11 + page_size)
    pg = Paged(g, lens_k, hk, d, page_size)
    q = torch.randn(len(lens_k), 1, h, d, device="cuda", dtype=BF16, generator=g)
    out, _ = fa4aot.flash_attn_varlen_func(
        q, pg.k, pg.v, seqused_k=pg.seqused, page_table=pg.table, causal=True, runtime=runtime
    )
    torch.cuda.synchronize()
    check(out.flatten(0, 1), None, list(q.unbind(0)), pg.ks, pg.vs, causal=True)


# --- sinks and softcap -----------------------------------------------------------------------


def _sink_case(seed, page_size):
    lens_q, lens_k = [1, 513, 0, 200, 1000], [300, 513, 40, 1200, 1000]  # gpt-oss: hd 64, 64/8 heads
    h, hk, d = 64, 8, 64
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=BF16, generator=g)
    sink = (torch.randn(h, device="cuda", generator=g) * 2).to(BF16)
    if page_size:
        pg = Paged(g, lens_k, hk, d, page_size)
        k, v, ks, vs, extra = pg.k, pg.v, pg.ks, pg.vs, dict(page_table=pg.table)
    else:
        k = torch.randn(len(lens_k), max(lens_k), hk, d, device="cuda", dtype=BF16, generator=g)
        v = torch.randn(len(lens_k), max(lens_k), hk, d, device="cuda", dtype=BF16, generator=g)
        ks = [k[i, :n] for i, n in enumerate(lens_k)]
        vs = [v[i, :n] for i, n in enumerate(lens_k)]
        extra = {}
    used = torch.tensor(lens_k, dtype=torch.int32, device="cuda")
    return lens_q, q, k, v, ks, vs, sink, used, extra


@pytest.mark.parametrize("page_size", [None, 128, 16])
@pytest.mark.parametrize("window", [None, (127, 0)])
def test_learnable_sink_matches_reference(runtime, window, page_size):
    lens_q, q, k, v, ks, vs, sink, used, extra = _sink_case(3, page_size)
    out, lse = fa4aot.flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu_seqlens(lens_q), max_seqlen_q=max(lens_q), seqused_k=used, causal=True,
        window_size=window or (None, None), learnable_sink=sink, return_lse=True, runtime=runtime, **extra,
    )  # fmt: skip
    torch.cuda.synchronize()
    check(out, lse, list(q.split(lens_q)), ks, vs, causal=window is None, window=window or (None, None), sink=sink)


@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("window", [None, (255, 0)])
def test_softcap_matches_reference(runtime, d, window):
    lens_q, lens_k = [300, 1, 1000, 64], [300, 900, 1000, 2000]  # Gemma-2: softcap 50, 2 q heads per kv head
    h, hk = 16, 8
    g = torch.Generator(device="cuda").manual_seed(d)
    q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=BF16, generator=g) * 3  # large scores reach the cap
    k = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=BF16, generator=g) * 3
    v = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=BF16, generator=g)
    out, lse = fa4aot.flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu_seqlens(lens_q), cu_seqlens_k=cu_seqlens(lens_k), max_seqlen_q=max(lens_q),
        max_seqlen_k=max(lens_k), causal=True, window_size=window or (None, None), softcap=50.0,
        return_lse=True, runtime=runtime,
    )  # fmt: skip
    torch.cuda.synchronize()
    check(
        out, lse, list(q.split(lens_q)), list(k.split(lens_k)), list(v.split(lens_k)),
        causal=window is None, window=window or (None, None), softcap=50.0,
    )  # fmt: skip


# --- vLLM's call pattern through the engine entry point --------------------------------------


@pytest.mark.parametrize("page_size", [16, 128])
def test_vllm_call_pattern_replay(runtime, page_size):
    """vLLM's FA4 backend on a mixed batch (decodes and prefill chunks in one call), gpt-oss
    layer style: _flash_attn_fwd(q, k_cache, v_cache, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
    seqused_k, page_table=block_table, learnable_sink=s_aux, window_size_left/right,
    softmax_scale, causal, num_splits, return_lse, out) - sliding and full layers alternate."""
    lens_q, lens_k = [1, 1, 250, 1, 37], [4000, 17, 250, 999, 1037]
    h, hk, d = 64, 8, 64
    g = torch.Generator(device="cuda").manual_seed(7)
    pg = Paged(g, lens_k, hk, d, page_size)
    q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=BF16, generator=g)
    s_aux = torch.randn(h, device="cuda", generator=g).to(BF16)
    out = torch.full_like(q, float("nan"))
    scale = d**-0.5
    for wl, wr in [(127, 0), (-1, -1), (127, 0)]:  # sliding and full layers alternate
        o, lse, *rest = fi._flash_attn_fwd(
            q, pg.k, pg.v, cu_seqlens_q=cu_seqlens(lens_q), max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k),
            seqused_k=pg.seqused, page_table=pg.table, learnable_sink=s_aux, window_size_left=wl,
            window_size_right=wr, softmax_scale=scale, causal=True, num_splits=1, return_lse=True, out=out,
            runtime=runtime,
        )  # fmt: skip
        torch.cuda.synchronize()
        assert o is out and rest == [None, None, None] and lse.shape == (h, sum(lens_q))
        window = (wl, wr) if wl >= 0 else (None, None)
        check(out, lse, list(q.split(lens_q)), pg.ks, pg.vs, causal=wl < 0, window=window, sink=s_aux, scale=scale)


# --- bitwise equality with FA4's own JIT output ----------------------------------------------


def _both(call, runtime):
    """Run ``call(fn)`` with fa4aot's engine entry and with FA4's; return both (out, lse)."""
    fa4 = _fa4()
    ours = call(functools.partial(fi._flash_attn_fwd, runtime=runtime))
    theirs = call(fa4._flash_attn_fwd)
    torch.cuda.synchronize()
    return ours[:2], theirs[:2]


def _bitwise(ours, theirs):
    for a, b in zip(ours, theirs):
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a.view(torch.int16) if a.dtype == BF16 else a.view(torch.int32),
                           b.view(torch.int16) if b.dtype == BF16 else b.view(torch.int32))  # fmt: skip


BITWISE_KINDS = [
    "dense",
    "varlen-workspace",
    "paged-tma-decode",
    "paged-cpasync-decode",
    "paged-tma-chunked-prefill",
    "paged-cpasync-chunked-prefill",
    "sink",
    "sink-window",
    "sink-window-paged",
    "softcap",
    "softcap-window-hd256",
]


@pytest.mark.parametrize("kind", BITWISE_KINDS)
def test_bitwise_equal_to_fa4_jit(runtime, kind):
    if kind == "dense":
        g = torch.Generator(device="cuda").manual_seed(7)
        q, k, v = (torch.randn(2, 1000, 16, 128, device="cuda", dtype=BF16, generator=g) for _ in range(3))

        def call(fn):
            return fn(q, k, v, causal=True, return_lse=True)
    elif kind == "varlen-workspace":  # cu_seqlens_k, no page table: FA4's tensor-map workspace
        lens_q, lens_k = [5, 0, 300, 1, 129], [40, 7, 300, 1000, 129]
        g = torch.Generator(device="cuda").manual_seed(8)
        q = torch.randn(sum(lens_q), 16, 128, device="cuda", dtype=BF16, generator=g)
        k = torch.randn(sum(lens_k), 4, 128, device="cuda", dtype=BF16, generator=g)
        v = torch.randn(sum(lens_k), 4, 128, device="cuda", dtype=BF16, generator=g)

        def call(fn):
            return fn(q, k, v, cu_seqlens_q=cu_seqlens(lens_q), cu_seqlens_k=cu_seqlens(lens_k), max_seqlen_q=max(lens_q),
                      max_seqlen_k=max(lens_k), causal=True, return_lse=True)  # fmt: skip
    elif kind.startswith("paged"):
        page_size = 128 if "tma" in kind else 16
        phase = "decode" if kind.endswith("decode") else "chunked-prefill"
        lens_q, lens_k, pg, q = _paged_case(phase, page_size, seed=21)

        def call(fn):
            return fn(q, pg.k, pg.v, cu_seqlens_q=cu_seqlens(lens_q), max_seqlen_q=max(lens_q), seqused_k=pg.seqused,
                      page_table=pg.table, causal=True, return_lse=True)  # fmt: skip
    elif kind.startswith("sink"):
        page_size = 16 if kind.endswith("paged") else None
        lens_q, q, k, v, _, _, sink, used, extra = _sink_case(5, page_size)
        wl = 127 if "window" in kind else None

        def call(fn):
            return fn(q, k, v, cu_seqlens_q=cu_seqlens(lens_q), max_seqlen_q=max(lens_q), seqused_k=used, causal=True,
                      window_size_left=wl, window_size_right=0 if wl else None, learnable_sink=sink,
                      return_lse=True, **extra)  # fmt: skip
    else:
        d = 256 if kind.endswith("hd256") else 128
        wl = 255 if "window" in kind else None
        lens_q, lens_k = [300, 1, 1000], [300, 900, 1000]
        g = torch.Generator(device="cuda").manual_seed(9)
        q = torch.randn(sum(lens_q), 16, d, device="cuda", dtype=BF16, generator=g) * 3
        k = torch.randn(sum(lens_k), 8, d, device="cuda", dtype=BF16, generator=g) * 3
        v = torch.randn(sum(lens_k), 8, d, device="cuda", dtype=BF16, generator=g)

        def call(fn):
            return fn(q, k, v, cu_seqlens_q=cu_seqlens(lens_q), cu_seqlens_k=cu_seqlens(lens_k), max_seqlen_q=max(lens_q),
                      max_seqlen_k=max(lens_k), causal=True, window_size_left=wl, window_size_right=0 if wl else None,
                      softcap=50.0, return_lse=True)  # fmt: skip

    ours, theirs = _both(call, runtime)
    _bitwise(ours, theirs)


@pytest.mark.parametrize("with_sink", [False, True])
def test_a_call_without_keys_returns_fa4s_result(runtime, with_sink):
    """No keys: out = 0, lse = -inf (or the head's sink), nothing launched; out starts as NaN."""
    b, sq, h, hk, d = 2, 5, 8, 2, 128
    q = torch.randn(b, sq, h, d, device="cuda", dtype=BF16)
    k = torch.empty(b, 0, hk, d, device="cuda", dtype=BF16)
    sink = torch.randn(h, device="cuda").to(BF16) if with_sink else None
    out = torch.full_like(q, float("nan"))
    o, lse, *_ = fi._flash_attn_fwd(q, k, k, learnable_sink=sink, return_lse=True, out=out, runtime=runtime)
    torch.cuda.synchronize()
    assert o is out and torch.equal(out, torch.zeros_like(out))
    want = sink.float()[None, :, None].expand(b, h, sq) if with_sink else torch.full((b, h, sq), float("-inf"))
    assert torch.equal(lse, want.to(lse.device))
