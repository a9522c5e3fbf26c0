"""The "fa4aot" transformers backend on the GPU: small random-weight models (tests/gpu/
transformers_models.py: Llama-style GQA, Qwen2, Gemma 2 with softcap and sliding windows, gpt-oss
with sinks and sliding windows) against transformers' own backend (sdpa; eager for Gemma 2 and
gpt-oss): the logits of a 2 x 300-token prefill and of 32 greedy decode steps (teacher-forced:
both models are fed the reference's tokens, so one near-tie cannot make the runs diverge), within
bf16 tolerance; and every attention call served by a cached kernel: one fa4aot launch per layer
and step, no miss, and FA4 never imported (zero JIT).

Needs transformers and a cache holding manifests/transformers-h100.yaml (FA4AOT_GPU_CACHE)::

    fa4aot build manifests/transformers-h100.yaml --cache /tmp/tf-cache
    FA4AOT_GPU_CACHE=/tmp/tf-cache python -m pytest -q tests/gpu/test_transformers.py
"""

from __future__ import annotations

import sys

import pytest

transformers = pytest.importorskip("transformers", reason="needs transformers")
torch = pytest.importorskip("torch")

import fa4aot  # noqa: E402
from fa4aot.runtime import loader  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from transformers_models import MODELS, attention_layers, build  # noqa: E402

PREFILL, STEPS, BATCH = 300, 32, 2


@pytest.fixture(scope="module", autouse=True)
def default_runtime(runtime):
    """The backend uses the default runtime: the session's, over FA4AOT_GPU_CACHE."""
    old = loader._DEFAULT
    loader.set_default_runtime(runtime)
    yield runtime
    loader.set_default_runtime(old)


def assert_close_logits(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Within bf16 tolerance of the reference, relative to the logits' scale."""
    diff = (ours.float() - ref.float()).abs()
    err, scale = diff.max().item(), ref.float().abs().max().item()
    bad = (diff.amax(-1) > 0.03 * scale + 1e-3).float().mean().item()  # share of tokens off (diagnosis)
    assert err <= 0.03 * scale + 1e-3, (
        f"{what}: max |diff| {err:.4g} vs max |logit| {scale:.4g}; {bad:.1%} of tokens off"
    )


def run_pair(ref, ours, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[int, int]:
    """Prefill ``ids`` and STEPS greedy steps (the reference's tokens fed to both); compare logits
    at each. Returns (decode steps whose greedy token agrees, steps)."""
    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    r, o = ref(ids, use_cache=True, **kw), ours(ids, use_cache=True, **kw)
    valid = slice(None) if attention_mask is None else attention_mask.bool()
    assert_close_logits(o.logits[valid], r.logits[valid], "prefill")
    past_r, past_o = r.past_key_values, o.past_key_values
    tok = r.logits[:, -1].argmax(-1, keepdim=True)
    agree = 0
    for step in range(STEPS):
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(BATCH, 1)], dim=1)
            kw = {"attention_mask": attention_mask}
        r = ref(tok, past_key_values=past_r, use_cache=True, **kw)
        o = ours(tok, past_key_values=past_o, use_cache=True, **kw)
        assert_close_logits(o.logits[:, -1], r.logits[:, -1], f"decode step {step}")
        agree += bool((o.logits[:, -1].argmax(-1) == r.logits[:, -1].argmax(-1)).all())
        past_r, past_o = r.past_key_values, o.past_key_values
        tok = r.logits[:, -1].argmax(-1, keepdim=True)
    return agree, STEPS


@pytest.mark.parametrize("name", sorted(MODELS))
def test_prefill_and_greedy_decode_match_transformers(name, runtime):
    had_fa4 = "flash_attn.cute.interface" in sys.modules
    ref_impl = MODELS[name][2]
    ref = build(name, ref_impl)
    ours = build(name, "fa4aot", state=ref.state_dict())
    ids = torch.randint(0, ours.config.vocab_size, (BATCH, PREFILL), device="cuda")
    before = runtime.stats()
    with torch.no_grad():
        agree, steps = run_pair(ref, ours, ids)
    after = runtime.stats()
    print(f"{name}: greedy tokens agree with {ref_impl} at {agree}/{steps} decode steps")
    assert after.misses == before.misses and after.invalid == before.invalid
    calls = attention_layers(name) * (1 + STEPS)  # one fa4aot launch per layer and forward pass
    assert after.launches.get("fwd_sm90", 0) - before.launches.get("fwd_sm90", 0) == calls
    assert had_fa4 or "flash_attn.cute.interface" not in sys.modules  # zero JIT: FA4 never imported


def test_left_padded_batch_matches_sdpa(runtime):
    """Prompts of 300 and 200 tokens, left-padded as generate() pads: FA4's varlen kernels on the
    unpadded tokens, the output padded back."""
    ref = build("llama-gqa", "sdpa")
    ours = build("llama-gqa", "fa4aot", state=ref.state_dict())
    ids = torch.randint(0, ours.config.vocab_size, (BATCH, PREFILL), device="cuda")
    mask = torch.ones(BATCH, PREFILL, dtype=torch.long, device="cuda")
    mask[1, :100] = 0
    with torch.no_grad():
        run_pair(ref, ours, ids, mask)


def test_generate_runs_on_fa4aot_and_stats_count_it(runtime):
    ours = build("qwen2", "fa4aot")
    ids = torch.randint(0, ours.config.vocab_size, (BATCH, PREFILL), device="cuda")
    before = fa4aot.stats()
    out = ours.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (BATCH, PREFILL + 8)
    after = fa4aot.stats()
    assert after.total_launches - before.total_launches == attention_layers("qwen2") * 8
