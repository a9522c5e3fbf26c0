"""Tuned dispatch on a real GPU: every tuning candidate the cache holds, and every choice in this
device's tuning table (written by `fa4aot tune` before this runs), against the float32
reference with FA4's tolerance rule."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from fa4aot.core import selector  # noqa: E402
from fa4aot.core.tuning import TUNABLE_FIELDS, result_class_difference  # noqa: E402
from fa4aot.tools import tune  # noqa: E402

#: Largest float32 score block the chunked reference materialises at once (elements).
MAX_SCORE_ELEMS = 2**28


def _ref(q, k, v, causal, upcast):
    """(sq, h, d) x (sk, h, d) attention, in float32 or in the inputs' precision."""
    dt = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    s = torch.einsum("qhd,khd->hqk", q * (1.0 / math.sqrt(q.shape[-1])), k).float()
    if causal:
        sq, sk = q.shape[0], k.shape[0]
        qi = torch.arange(sq, device=q.device)[:, None]
        ki = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(ki > qi + sk - sq, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    o = torch.einsum("hqk,khd->qhd", p.to(v.dtype), v)
    return o.float() if upcast else o.to(dt)


def check_chunked(out, q, k, v, causal, seqs):
    """FA4's rule, |out - ref| <= 2 |ref_lowprec - ref| + slack, with the maxima taken over the
    whole output but the reference computed per sequence and head group (16k x 16k fits)."""
    h, hk = q.shape[-2], k.shape[-2]
    g = h // hk
    err = err_lo = slack = 0.0
    for qs, ks in seqs:
        sq, sk = qs.stop - qs.start, ks.stop - ks.start
        step = max(g, (MAX_SCORE_ELEMS // max(1, sq * sk)) // g * g)
        for h0 in range(0, h, step):
            hs = slice(h0, min(h, h0 + step))
            kv = slice(h0 // g, (hs.stop + g - 1) // g)
            kk = k[ks, kv].repeat_interleave(g, dim=1)  # step is a multiple of g: exactly hs's heads
            vv = v[ks, kv].repeat_interleave(g, dim=1)
            qq = q[qs, hs]
            ref = _ref(qq, kk, vv, causal, True).to(out.dtype)
            lo = _ref(qq, kk, vv, causal, False)
            o = out[qs, hs]
            err = max(err, (o - ref).abs().max().item())
            err_lo = max(err_lo, (lo - ref).abs().max().item())
            slack = max(slack, 2 * (ref + 0.3 - 0.3 - ref).abs().max().item())
    assert err <= 2 * err_lo + slack, f"max error {err:.3g}; bf16 reference {err_lo:.3g}, slack {slack:.3g}"


def _seqs(run: tune.ShapeRun):
    s = run.shape
    if s.varlen:
        cu = run.cu.tolist()
        return [(slice(a, b), slice(a, b)) for a, b in zip(cu, cu[1:])], run.out, run.q, run.k, run.v
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    qs = [
        (slice(i * s.seqlen_q, (i + 1) * s.seqlen_q), slice(i * s.seqlen_k, (i + 1) * s.seqlen_k))
        for i in range(s.batch)
    ]
    return qs, flat(run.out), flat(run.q), flat(run.k), flat(run.v)


def _check(run: tune.ShapeRun, vid: str) -> None:
    run.select(vid)
    run.out.fill_(float("nan"))
    run.fn()
    torch.cuda.synchronize()
    seqs, o, q, k, v = _seqs(run)
    check_chunked(o, q, k, v, run.shape.causal, seqs)


@pytest.fixture(autouse=True)
def restore_tuning(runtime):
    """The tests route calls by hand (``ShapeRun.select``); afterwards the table's routing is back."""
    yield
    for lv in list(runtime._loaded.values()):
        lv.tuned = runtime.tuning.get(lv.variant.variant_id)


def _table(runtime):
    if runtime.tuning_table is None:
        pytest.fail(
            f"no tuning table for this GPU: run `fa4aot tune manifests/h100.yaml --cache {runtime.cache.root}` first"
        )
    return runtime.tuning_table


def test_every_candidate_the_cache_holds_matches_the_reference(runtime):
    """Any candidate may win on some device: each is checked on a shape its default serves
    (batch 2, GQA and varlen as the variant is built, seqlen 1000 x 1100 - not a tile multiple)."""
    checked = 0
    for vid in runtime.variant_ids():
        v = runtime.index.entry(vid).variant
        if v.family not in TUNABLE_FIELDS or v.fields["paged_kv"] != "none" or v.fields["learnable_sink"] != "none":
            continue
        f = v.fields
        if f["softcap"] or f["local"] or f["has_lse"] or f["seqused_k"] or f["varlen_q"] != f["varlen_k"]:
            continue
        qh = f["qhead_per_kvhead"]
        sk = 1000 if f["varlen_q"] else 1100
        shape = tune.TuneShape(2, 1000, sk, 4 * qh, 4, f["head_dim"], f["causal"], f["varlen_q"], f["dtype"])
        with selector.using(runtime.selector):  # FA4's choice as the runtime makes it (no flash-attn needed)
            default = tune.default_variant(shape, runtime.target)
        if result_class_difference(v.family, default.fields, f) is not None or vid == default.variant_id:
            continue
        if not runtime.has(default):
            continue
        _check(tune.ShapeRun(runtime, shape, default.variant_id, seed=checked), vid)
        checked += 1
    assert checked >= 10, f"only {checked} candidates checked: build manifests/h100.yaml (it lists the candidates)"


def test_every_tuned_choice_matches_the_reference_on_its_measured_shape(runtime):
    table = _table(runtime)
    if not table.entries:
        # `fa4aot tune` writes an entry only where a candidate beat FA4's choice beyond the noise;
        # every candidate's numerics are checked above whatever tune decided
        pytest.skip("the device's tuning table has no entries: tune kept FA4's choice on every shape")
    assert runtime.tuning, "the table has entries but none this cache can honour (stale?)"
    for e in table.entries:
        shape = tune.parse_shape(e.shape)
        run = tune.ShapeRun(runtime, shape, e.default)
        assert runtime.tuning[e.default][shape.bucket()] == e.choice
        lv = runtime._load_id(e.default)
        assert lv.tuned is not None and lv.tuned.get(shape.bucket()) == e.choice  # what calls consult
        run.select(e.choice)
        _check(run, e.choice)
        del run
        torch.cuda.empty_cache()
