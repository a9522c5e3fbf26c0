"""Inputs and reference pieces the PyTorch GPU tests share (importable by name: pytest puts
tests/gpu on sys.path). Import it after ``torch = pytest.importorskip("torch")``."""

from __future__ import annotations

import torch


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    """A bf16 CUDA tensor of standard normals from a generator of its own, seeded with ``seed``."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)


def qkv(b: int, s: int, h: int, d: int, hk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (b, s, h, d) and k, v (b, s, hk, d) (``hk`` defaults to ``h``), from seeds 0, 1 and 2."""
    hk = h if hk is None else hk
    return rand(b, s, h, d), rand(b, s, hk, d, seed=1), rand(b, s, hk, d, seed=2)


def cu_seqlens(lens: list[int]) -> torch.Tensor:
    """The cumulative sequence lengths of a varlen call over sequences of ``lens`` (int32, on the GPU)."""
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


def varlen_args(lens_q: list[int], lens_k: list[int]) -> dict:
    """The keywords of a varlen call over query and key sequences of these lengths:
    cu_seqlens_q/k and max_seqlen_q/k."""
    return dict(
        cu_seqlens_q=cu_seqlens(lens_q),
        cu_seqlens_k=cu_seqlens(lens_k),
        max_seqlen_q=max(lens_q),
        max_seqlen_k=max(lens_k),
    )


def upcast_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upcast: bool, heads_dim: int):
    """A reference's inputs: q, k, v in float32 (``upcast``) or as they are, with K and V's heads
    (dimension ``heads_dim``) repeated to as many as Q's (GQA)."""
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    group = q.shape[heads_dim] // k.shape[heads_dim]
    return q, k.repeat_interleave(group, dim=heads_dim), v.repeat_interleave(group, dim=heads_dim)
