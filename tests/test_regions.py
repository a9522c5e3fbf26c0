"""FA4's forward decision reused by region (runtime/regions.py): the traced numbers note what the
selection does with them, and a region's decision equals FA4's own decision for every shape it
takes - checked against plain decisions (FA4's selector on each shape) on every arch, over random
static calls and shape sequences shaped like serving and training."""

from __future__ import annotations

import math
import random

import pytest

from fa4aot.core import selector
from fa4aot.core.errors import Fa4aotError
from fa4aot.core.targets import MODELS
from fa4aot.core.variant import FORWARD_FAMILY
from fa4aot.runtime import regions
from fa4aot.runtime.dispatch import ForwardRule, Shape, StaticCall

SMS = {m.arch: m.num_sms for m in reversed(list(MODELS.values()))}


def _trace(fn, **values):
    return regions.trace(lambda facts: fn(**facts), values)


def test_comparisons_and_their_outcomes_draw_the_region():
    def decide(batch, max_seqlen_k, **_):
        blocks = (max_seqlen_k + 127) // 128
        return 2 if batch * blocks > 132 else 1

    got, check = _trace(decide, batch=4, max_seqlen_k=1000)
    assert got == 1
    assert check(4, 1000) and check(16, 1024) and not check(17, 1024)


def test_values_that_leave_arithmetic_are_pinned():
    def decide(batch, max_seqlen_k, **_):
        return {"splits": max(1, min(132 // batch, 8)), "hashed": hash(max_seqlen_k) & 0, "n": int(batch)}

    got, check = _trace(decide, batch=40, max_seqlen_k=77)
    assert got == {"splits": 3, "hashed": 0, "n": 40}  # concrete values, no traced numbers
    assert check(40, 77) and not check(41, 77) and not check(40, 78)


def test_floats_ceil_and_isinstance_follow_the_value():
    def decide(batch, total_q, **_):
        assert isinstance(batch, int)
        return math.ceil(total_q / batch) > 3

    got, check = _trace(decide, batch=4, total_q=13)
    assert got is True
    assert check(4, 16) and not check(4, 12) and check(5, 16)


def test_a_zero_divisor_outside_the_region_is_not_a_match():
    got, check = _trace(lambda batch, total_q, **_: (total_q // batch) > 2, batch=2, total_q=7)
    assert got is True
    r = regions.Regions()
    r.add(("k",), check, "decision")
    assert r.find(("k",), (2, 7)) == "decision" and r.find(("k",), (0, 7)) is None


def _statics(arch: str, rng: random.Random) -> list[StaticCall]:
    sms = SMS[arch]
    sm120 = arch == "sm_120a"  # FA4's SM80 kernel there: no paging, no sink, head dims <= 128
    out = []
    for _ in range(10):
        hd = rng.choice([(64, 64), (128, 128)] if sm120 else [(64, 64), (128, 128), (192, 128), (256, 256), (96, 96)])
        hk = rng.choice([1, 2, 8])
        varlen_q = rng.random() < 0.5
        paged = not sm120 and rng.random() < 0.3
        out.append(
            StaticCall(
                arch,
                sms,
                "bf16",
                hd[0],
                hd[1],
                hk * rng.choice([1, 4, 8]),
                hk,
                rng.random() < 0.6,
                varlen_q=varlen_q,
                varlen_k=varlen_q and not paged and rng.random() < 0.7,
                seqused_k=paged or rng.random() < 0.3,
                pack_gqa=rng.choice([None, None, True, False]),
                has_lse=rng.random() < 0.4,
                paged=paged,
                learnable_sink="none" if sm120 else rng.choice(["none", "none", "bf16"]),
                softcap=rng.choice([0.0, 0.0, 30.0]),
            )  # fmt: skip
        )
    return out


def _shapes(s: StaticCall, rng: random.Random, n: int) -> list[Shape]:
    """A serving-like sequence (max_seqlen_k growing by one, batch drifting) and random jumps."""
    out = []
    batch, max_k = rng.randint(1, 64), rng.randint(1, 8192)
    page = rng.choice([16, 64, 128, 256]) if s.paged else None
    window = (rng.randint(0, 4096), rng.choice([0, 0, 128])) if rng.random() < 0.2 else (None, None)
    splits = 1 if s.arch == "sm_120a" else rng.choice([1, 1, 0, 3])
    for _ in range(n):
        if rng.random() < 0.15:  # a jump: prefill, a long context, a big batch
            batch = rng.choice([1, 2, rng.randint(1, 512), rng.randint(1, 70000)])
            max_k = rng.choice([1, rng.randint(1, 300), rng.randint(1, 131072)])
        else:  # a decode step
            max_k += 1
            batch = max(1, batch + rng.choice([-1, 0, 0, 1]))
        max_q = 1 if rng.random() < 0.6 else rng.randint(1, 4096)
        total_q = rng.randint(batch, batch * max_q) if s.varlen_q else batch * max_q
        total_k = rng.randint(batch, batch * max_k) if s.varlen_k else batch * max_k
        q_cap = total_q if s.varlen_q else max_q
        k_cap = -(-max_k // page) * page if page else (total_k if s.varlen_k else max_k)
        given_q = max_q if s.varlen_q else None
        given_k = max_k if (s.varlen_k or s.paged) else None
        out.append(Shape(batch, total_q, total_k, q_cap, k_cap, given_q, given_k, *window, page, splits))
    return out


def _plain(rule: ForwardRule, shape: Shape):
    try:
        d = rule.decision(shape)
    except Fa4aotError as e:
        return type(e)
    return d.config, d.plan, d.fields


def _by_region(rule: ForwardRule, shape: Shape):
    d = rule.region(shape)
    if d is None:
        traced = rule.traced_decision(shape)
        if traced is None:
            return _plain(rule, shape)
        d = traced[0]
        rule.regions.add(*traced[1], d)
    return d.config, d.plan, d.fields


@pytest.mark.parametrize("arch", sorted(FORWARD_FAMILY))
def test_a_regions_decision_is_fa4s_for_every_shape_it_takes(arch):
    """Per arch: 10 random static calls x 60 shapes; a region's answer equals FA4's plain
    decision on the shape (config, plan and variant fields), and regions are reused."""
    sel = selector.installed()
    rng = random.Random(f"regions-{arch}")
    reused = 0
    for s in _statics(arch, rng):
        traced, plain = ForwardRule(s, sel, regions_knobs()), ForwardRule(s, sel, regions_knobs())
        plain.regions = None
        for shape in _shapes(s, rng, 60):
            assert _by_region(traced, shape) == _plain(plain, shape), (s, shape)
        reused += traced.regions.reuses
    assert reused > 100, reused


def regions_knobs():
    from fa4aot.core.fa4_interface import NO_KNOBS

    return NO_KNOBS
