"""Serving-engine forward on the CPU (fake driver): FA4's exact signatures and positional order,
the engine entry point replaying vLLM's FA4 call pattern, paged KV / sink / softcap validation,
and FA4 arguments fa4aot does not build."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
from fake_driver import FakeDriver

import fa4aot
import fa4aot.interface as fi
from fa4aot.core.errors import ArgumentError
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.tensors import RawTensor

B = 0x7F30_0000_0000


def t(i, shape, dtype="bf16", strides=None, offset=0):
    return RawTensor(B + i * (1 << 36) + offset, tuple(shape), dtype, strides)


@pytest.fixture(params=[((10, 0), 148), ((9, 0), 132)], ids=["sm100", "sm90"])
def rt(request, built_cache):
    cc, sms = request.param
    drv = FakeDriver(cc=cc, num_sms=sms)
    return Runtime(built_cache, driver=drv)


def _passed(launch, ptr: int) -> bool:
    """The launch's parameters carry address ``ptr`` (a tensor or a TMA descriptor's base)."""
    return any(ptr.to_bytes(8, "little") in p for p in launch.params)


# --- FA4's signatures --------------------------------------------------------------------------


def _fa4_signatures() -> dict[str, tuple[list[str], list[str]]]:
    """Positional and keyword-only parameter names of FA4's interface functions, read from its
    source (no import)."""
    spec = importlib.util.find_spec("flash_attn")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("flash-attn-4 is not installed (the build extra)")
    src = Path(next(iter(spec.submodule_search_locations))) / "cute" / "interface.py"
    tree = ast.parse(src.read_text())
    return {
        node.name: ([a.arg for a in node.args.posonlyargs + node.args.args], [a.arg for a in node.args.kwonlyargs])
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
    }


@pytest.mark.parametrize(
    "name, ours",
    [
        ("flash_attn_func", fa4aot.flash_attn_func),
        ("flash_attn_varlen_func", fa4aot.flash_attn_varlen_func),
        ("_flash_attn_fwd", fi._flash_attn_fwd),
        ("_get_scheduler_metadata", fi._get_scheduler_metadata),
    ],
)
def test_positional_parameters_are_fa4s_in_fa4s_order(name, ours):
    import inspect

    fa4, fa4_kw = _fa4_signatures()[name]
    params = inspect.signature(ours).parameters.values()
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == fa4
    # FA4's keyword-only parameters stay keyword-only; fa4aot's extras are keyword-only too, so
    # no positional call can reach them
    kw = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    assert set(fa4_kw) <= kw <= set(fa4_kw) | {"out", "stream", "runtime"}


def test_the_engine_entry_has_a_public_alias():
    assert fa4aot.flash_attn_fwd is fi._flash_attn_fwd
    assert fi.flash_attn_func is fa4aot.flash_attn_func


# --- positional calls mean what they mean to FA4 ---------------------------------------------


def test_a_positional_call_written_for_fa4_gets_fa4s_meaning(rt):
    """flash_attn_func(q, k, v, qv, gather_kv_indices, softmax_scale, causal, window_size,
    learnable_sink, softcap): a sink passed in FA4's 9th place is the sink."""
    b, s, h, hk, d = 2, 512, 16, 2, 64
    q, k, v, out = t(0, (b, s, h, d)), t(1, (b, s, hk, d)), t(2, (b, s, hk, d)), t(3, (b, s, h, d))
    sink = t(4, (h,))
    fa4aot.flash_attn_func(q, k, v, None, None, 0.125, True, (128, 0), sink, out=out, runtime=rt)
    (launch,) = rt.driver.launches
    (lv,) = rt._loaded.values()
    f = lv.variant.fields
    assert f["learnable_sink"] == "bf16" and f["local"] and not f["causal"] and f["softcap"] == 0.0
    assert _passed(launch, sink.ptr)


def test_the_old_num_splits_place_is_an_error_not_a_silent_swap(rt):
    """Before fa4aot took FA4's order, num_splits sat where FA4 has learnable_sink: such a call
    now fails, naming the argument, and launches nothing."""
    x, out = t(0, (2, 128, 8, 128)), t(3, (2, 128, 8, 128))
    with pytest.raises(ArgumentError, match="learnable_sink"):
        fa4aot.flash_attn_func(x, x, x, None, None, None, False, (None, None), 4, out=out, runtime=rt)
    with pytest.raises(ArgumentError, match="softcap"):
        fa4aot.flash_attn_func(x, x, x, None, None, None, False, (None, None), None, "4", out=out, runtime=rt)
    assert rt.driver.launches == []


def test_varlen_positional_page_table(rt):
    """flash_attn_varlen_func's 13th parameter is page_table, as in FA4 (SGLang's call): the
    variant asked for is the paged one."""
    from fa4aot.core.errors import VariantNotFoundError

    b, h, hk, d, ps, pages = 3, 32, 8, 128, 128, 8
    tq = 3
    q, out = t(0, (tq, h, d)), t(3, (tq, h, d))
    kc, vc = t(1, (b * pages, ps, hk, d)), t(2, (b * pages, ps, hk, d))
    cu_q, seqused, table = t(4, (b + 1,), "int32"), t(5, (b,), "int32"), t(6, (b, pages), "int32")
    try:
        fa4aot.flash_attn_varlen_func(
            q, kc, vc, None, cu_q, None, 1, pages * ps, None, None, seqused, None, table, None, True,
            out=out, runtime=rt,
        )  # fmt: skip
    except VariantNotFoundError as e:  # manifests/ci.yaml builds this variant only with LSE
        f = e.variant.fields
        assert rt.driver.launches == []
    else:  # a cache that has it: launched, with the page table
        (launch,) = rt.driver.launches
        (lv,) = rt._loaded.values()
        f = lv.variant.fields
        assert _passed(launch, table.ptr)
    # FA4 pages K/V by TMA when the page size is the config's tile_n (interface.py 1204-1208)
    assert f["paged_kv"] == ("tma" if ps == f["tile_n"] else "cpasync")
    assert f["varlen_q"] and f["seqused_k"] and f["causal"]


# --- vLLM's call pattern through the engine entry point --------------------------------------


@pytest.mark.parametrize("page_size", [128, 16])
@pytest.mark.parametrize("phase", ["decode", "chunked-prefill"])
def test_vllm_call_pattern_through_the_engine_entry(rt, page_size, phase):
    """vLLM's FA4 backend: _flash_attn_fwd(q, k_cache, v_cache, cu_seqlens_q, max_seqlen_q,
    max_seqlen_k, seqused_k, page_table=block_table, softmax_scale, causal, window_size_left/right,
    num_splits, return_lse, out) on a Llama-3-style GQA-4 paged cache."""
    b, h, hk, d = 4, 32, 8, 128
    max_k = 1000
    pages = -(-max_k // page_size)
    q_per_seq = 1 if phase == "decode" else 300
    tq = b * q_per_seq
    q, out = t(0, (tq, h, d)), t(3, (tq, h, d))
    kc, vc = t(1, (b * pages + 7, page_size, hk, d)), t(2, (b * pages + 7, page_size, hk, d))
    cu_q, seqused, table = t(4, (b + 1,), "int32"), t(5, (b,), "int32"), t(6, (b, pages), "int32")
    lse = t(7, (h, tq), "fp32")
    res = fi._flash_attn_fwd(
        q,
        kc,
        vc,
        cu_seqlens_q=cu_q,
        max_seqlen_q=q_per_seq,
        max_seqlen_k=max_k,
        seqused_k=seqused,
        page_table=table,
        softmax_scale=d**-0.5,
        causal=True,
        window_size_left=-1,
        window_size_right=-1,
        num_splits=1,
        return_lse=True,
        out=out,
        lse=lse,
        runtime=rt,
    )
    assert len(res) == 5 and res[0] is out and res[1] is lse and res[2:] == (None, None, None)
    (launch,) = rt.driver.launches
    (lv,) = rt._loaded.values()
    f = lv.variant.fields
    assert f["paged_kv"] == ("tma" if page_size == f["tile_n"] else "cpasync")
    assert f["varlen_q"] and f["seqused_k"] and f["causal"]
    for ptr in (table.ptr, seqused.ptr, cu_q.ptr):
        assert _passed(launch, ptr)


# --- validation ------------------------------------------------------------------------------


def _paged_args(b=2, h=16, hk=4, d=128, ps=128, pages=4, n=None):
    n = b * pages if n is None else n
    return dict(
        q=t(0, (b, 1, h, d)),
        k=t(1, (n, ps, hk, d)),
        v=t(2, (n, ps, hk, d)),
        page_table=t(6, (b, pages), "int32"),
        seqused_k=t(5, (b,), "int32"),
        out=t(3, (b, 1, h, d)),
    )


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(page_table=t(6, (2, 4), "int64")), "page_table: dtype must be int32"),
        (dict(page_table=t(6, (3, 4), "int32")), r"page_table: expected shape \(batch=2, max_pages\)"),
        (dict(page_table=t(6, (8,), "int32")), "page_table: expected 2 dimensions"),
        (dict(page_table=t(6, (2, 4), "int32", strides=(1, 2))), "page_table: dimension 1 must be contiguous"),
        (dict(page_table=t(6, (2, 4), "int32", offset=2)), "page_table: base address .* not 4-byte aligned"),
        (dict(k=t(1, (8, 128, 4, 64)), v=t(2, (8, 128, 4, 64))), "k .* must agree"),
        (dict(k=t(1, (8, 128, 4, 128)), v=t(2, (8, 64, 4, 128))), "k .* and v .* must agree"),
        (dict(k=t(1, (1024, 4, 128)), v=t(2, (1024, 4, 128))), "k: expected 4 dimensions"),
        (dict(cu_seqlens_k=t(8, (3,), "int32")), "page_table cannot be used with cu_seqlens_k"),
        (dict(learnable_sink=t(9, (8,), "fp32")), r"learnable_sink: expected shape \(nheads=16,\)"),
        (dict(learnable_sink=t(9, (16,), "int32")), "learnable_sink: dtype must be"),
        (dict(learnable_sink=t(9, (16, 1), "bf16")), "learnable_sink: expected 1 dimensions"),
        (dict(softcap=float("nan")), "softcap: must be finite"),
        (dict(softcap=float("inf")), "softcap: must be finite"),
        (dict(softcap=-1.0), "softcap: must be >= 0"),
        (dict(softcap="50"), "softcap: expected a number"),
        (dict(softcap=True), "softcap: expected a number"),
    ],
)
def test_paged_sink_and_softcap_arguments_are_checked_before_launch(rt, change, match):
    a = _paged_args()
    a.update(change)
    q, k, v, out = a.pop("q"), a.pop("k"), a.pop("v"), a.pop("out")
    with pytest.raises(ArgumentError, match=match):
        fa4aot.flash_attn_varlen_func(q, k, v, causal=True, out=out, runtime=rt, **a)
    assert rt.driver.launches == []


def test_a_page_size_the_cache_lacks_names_the_manifest_entry(rt):
    """Page 64 takes FA4's cp.async path, like 16; the CI cache has no head-dim-64 paged variant:
    the error gives the manifest group and says any page size but tile_n builds it."""
    from fa4aot.core.errors import VariantNotFoundError

    a = _paged_args(d=64, ps=64)
    with pytest.raises(VariantNotFoundError, match=r"paged_kv: \[64\].*any page size but 128 builds"):
        fa4aot.flash_attn_varlen_func(
            a["q"], a["k"], a["v"], page_table=a["page_table"], seqused_k=a["seqused_k"], causal=True,
            out=t(3, (2, 1, 16, 64)), runtime=rt,
        )  # fmt: skip
    assert rt.driver.launches == []


@pytest.mark.parametrize(
    "kw",
    [
        dict(qv=t(9, (2, 1, 16, 64))),
        dict(score_mod=lambda *a: a[0]),
        dict(mask_mod=lambda *a: True),
        dict(block_sparse_tensors=(1, 2)),
        dict(gather_kv_indices=t(9, (2, 8), "int32")),
        dict(aux_tensors=[t(9, (4,), "fp32")]),
        dict(seqlen_k_per_split=512),
    ],
)
def test_fa4_arguments_fa4aot_does_not_build_are_named(rt, kw):
    a = _paged_args()
    ((name, _),) = kw.items()
    with pytest.raises(ArgumentError, match=rf"^{name}: fa4aot does not build FA4's {name} path"):
        fi._flash_attn_fwd(
            a["q"], a["k"], a["v"], page_table=a["page_table"], seqused_k=a["seqused_k"], out=a["out"], runtime=rt,
            **kw,
        )  # fmt: skip
    assert rt.driver.launches == []


def test_fa4_defaults_of_unsupported_arguments_are_accepted(rt):
    """Engines pass FA4's defaults explicitly (score_mod=None, scales=None, ...): that is fine."""
    a = _paged_args()
    fi._flash_attn_fwd(
        a["q"], a["k"], a["v"], qv=None, score_mod=None, mask_mod=None, scales=None, config=None,
        disable_scheduler_metadata=False, page_table=a["page_table"], seqused_k=a["seqused_k"], causal=True,
        out=a["out"], runtime=rt,
    )  # fmt: skip
    assert len(rt.driver.launches) == 1


# --- calls without keys or queries (FA4 returns early; its host code would divide by zero) ----


@pytest.mark.parametrize(
    "kind",
    ["batched-k0", "varlen-k0", "paged-pool0", "paged-page-size0", "paged-table-cols0"],
)
def test_a_call_without_keys_writes_fa4s_result_and_launches_nothing(rt, kind):
    """out = 0 and lse = -inf, as FA4 returns (before this, FA4's exported host code divided by
    the empty extent and killed the process with SIGFPE)."""
    b, sq, h, hk, d = 2, 3, 16, 4, 128
    q, out = t(0, (b, sq, h, d)), t(3, (b, sq, h, d))
    kw = {}
    if kind == "batched-k0":
        k = v = t(1, (b, 0, hk, d))
    elif kind == "varlen-k0":
        q, out = t(0, (b * sq, h, d)), t(3, (b * sq, h, d))
        k = v = t(1, (0, hk, d))
        kw = dict(cu_seqlens_q=t(4, (b + 1,), "int32"), cu_seqlens_k=t(5, (b + 1,), "int32"), max_seqlen_q=sq)
    else:
        pool, page, cols = {
            "paged-pool0": (0, 128, 2),
            "paged-page-size0": (8, 0, 2),
            "paged-table-cols0": (8, 128, 0),
        }[kind]
        k = v = t(1, (pool, page, hk, d))
        kw = dict(page_table=t(6, (b, cols), "int32"), seqused_k=t(7, (b,), "int32"))
    lse = t(8, (h, b * sq) if "cu_seqlens_q" in kw else (b, h, sq), "fp32")
    res = fi._flash_attn_fwd(q, k, v, causal=True, out=out, lse=lse, runtime=rt, **kw)
    assert res[0] is out and res[1] is lse
    assert rt.driver.launches == []
    n_out = b * sq * h * d * 2 // 4  # bf16 out in 32-bit words
    assert rt.driver.memsets == [(out.ptr, 0, n_out, 0), (lse.ptr, 0xFF800000, b * sq * h, 0)]


def test_a_call_without_keys_gives_each_head_its_sink_as_lse(rt):
    """FA4: empty rows have lse == sink (per head), out == 0."""
    import struct

    b, sq, h, hk, d = 2, 3, 4, 2, 64
    q, out, lse = t(0, (b, sq, h, d)), t(3, (b, sq, h, d)), t(8, (b, h, sq), "fp32")
    sink = t(9, (h,), "bf16")
    values = [1.5, -2.0, 0.25, 8.0]
    rt.driver.memory[sink.ptr] = b"".join(struct.pack("<f", x)[2:] for x in values)  # bf16: top half of fp32
    fi._flash_attn_fwd(q, t(1, (b, 0, hk, d)), t(2, (b, 0, hk, d)), learnable_sink=sink, out=out, lse=lse, runtime=rt)
    assert rt.driver.launches == []
    words = [struct.unpack("<I", struct.pack("<f", x))[0] for x in values]
    # lse (b, h, sq): for head j, b rows of sq words, h * sq words apart
    want = [(out.ptr, 0, b * sq * h * d // 2, 0)]
    want += [(lse.ptr + j * sq * 4, h * sq * 4, w, sq, b, 0) for j, w in enumerate(words)]
    assert rt.driver.memsets == want


def test_a_call_without_queries_writes_nothing(rt):
    q, k = t(0, (0, 5, 16, 128)), t(1, (0, 5, 16, 128))
    fa4aot.flash_attn_func(q, k, k, out=t(3, (0, 5, 16, 128)), runtime=rt)
    assert rt.driver.launches == [] and rt.driver.memsets == []


# --- FA4's _get_scheduler_metadata options ----------------------------------------------------


@pytest.mark.parametrize("zfill", [True, False])
def test_zfill_padded_output_picks_the_prepare_kernel_built_with_it(rt, zfill):
    """``zfill_padded_output`` is compiled into FA4's prepare kernel (its compile key holds it):
    the call launches the variant built with the value given (tests/fast.yaml builds both)."""
    cu_q, cu_k = t(1, (9,), "int32"), t(2, (9,), "int32")
    md = fi._get_scheduler_metadata(
        8, 64, 512, 16, 4, 128, 4, 128, 128, pack_gqa=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        zfill_padded_output=zfill, runtime=rt,
    )  # fmt: skip
    (lv,) = [lv for lv in rt._loaded.values() if lv.variant.family == "prepare"]
    assert lv.variant.fields["zfill_padded_output"] is zfill
    assert md.fields["zfill_padded_output"] is zfill
    assert [launch.kernel for launch in rt.driver.launches] == lv.kernels[:1]


def test_a_zfill_padded_output_that_is_not_a_bool_is_refused_before_launch(rt):
    cu = t(1, (9,), "int32")
    with pytest.raises(ArgumentError, match=r"^zfill_padded_output: expected True or False, got 0"):
        fi._get_scheduler_metadata(
            8, 64, 512, 16, 4, 128, 4, 128, 128, cu_seqlens_q=cu, cu_seqlens_k=cu, zfill_padded_output=0, runtime=rt
        )
    assert rt.driver.launches == []
