"""Small random-weight transformers models (built from configs: nothing is downloaded) for the
"fa4aot" attention backend's GPU test and benchmarks/transformers_generate.py. Their attention
kernels are manifests/transformers-h100.yaml's; each model's reference backend is the one
transformers itself recommends for it (sdpa, or eager where sdpa lacks softcap or sinks).

gpt-oss routes every token to all of its experts (``num_experts_per_tok == num_local_experts``):
with top-k routing on random weights, a bf16-sized difference in attention flips some tokens'
expert choice, and their logits then differ by far more than the attention did."""

from __future__ import annotations

from typing import Any

#: name -> (transformers config class, config fields, reference attn_implementation)
MODELS: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama-gqa": (
        "LlamaConfig",
        dict(
            hidden_size=1024, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=16,
            num_key_value_heads=4, head_dim=64, vocab_size=1024, max_position_embeddings=2048,
        ),
        "sdpa",
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            hidden_size=1024, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048, use_sliding_window=False,
        ),
        "sdpa",
    ),
    "gemma2": (
        "Gemma2Config",
        dict(
            hidden_size=1024, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, head_dim=128, query_pre_attn_scalar=128, sliding_window=64,
            attn_logit_softcapping=50.0, final_logit_softcapping=None, vocab_size=1024,
            max_position_embeddings=2048, layer_types=["sliding_attention", "full_attention"],
        ),
        "eager",
    ),
    "gpt-oss": (
        "GptOssConfig",
        dict(
            hidden_size=512, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=1, head_dim=64, sliding_window=128, num_local_experts=2, num_experts_per_tok=2,
            vocab_size=1024, max_position_embeddings=2048, layer_types=["sliding_attention", "full_attention"],
        ),
        "eager",
    ),
}  # fmt: skip


def build(name: str, attn_implementation: str, seed: int = 0, state: dict | None = None) -> Any:
    """The model ``name`` in bf16 on the GPU with ``attn_implementation`` (weights from ``seed``,
    or ``state``, another build's state dict, so two backends run the same weights)."""
    import torch
    import transformers

    import fa4aot.integrations.transformers  # noqa: F401 - registers "fa4aot"

    cls, fields, _ = MODELS[name]
    config = getattr(transformers, cls)(**fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    model = model.to(device="cuda", dtype=torch.bfloat16).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def attention_layers(name: str) -> int:
    """Attention calls per forward pass (one per layer)."""
    return MODELS[name][1]["num_hidden_layers"]
