"""The size-budget allocation against exhaustive search, and the auto policy's YAML round trip.

``allocate`` (dynamic programming over bytes counted in steps) is checked against the exact
optimum of small random instances found by trying every combination: it must stay within the
budget and be at least as good as the exact optimum of the budget less one step per tensor (what
rounding each tensor's bytes up to whole steps can cost)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from jaxquant.calib import budget
from jaxquant.errors import PolicyError
from jaxquant.isq.policy import Policy


def random_sensitivity(rng, n_tensors: int, n_formats: int) -> budget.Sensitivity:
    cands, nbytes, delta = {}, {}, {}
    for t in range(n_tensors):
        name = f"blk.{t}.ffn_down.weight"
        size = int(rng.integers(1, 20)) * 1000
        b = np.sort(rng.choice(np.arange(2, 17), n_formats, replace=False)) * size // 8
        errors = np.sort(rng.exponential(size=n_formats))[::-1]  # more bytes, less predicted error
        cands[name] = tuple(f"F{j}" for j in range(n_formats))
        nbytes[name] = tuple(int(x) for x in b)
        delta[name] = tuple(float(e) for e in errors)
    return budget.Sensitivity(cands, nbytes, delta, fixed_bytes=500, n_weights=0)


@pytest.mark.parametrize("seed", range(6))
def test_allocate_near_exhaustive_optimum(seed):
    rng = np.random.default_rng(seed)
    sens = random_sensitivity(rng, 6, 3)
    names = list(sens.candidates)
    lo = sum(sens.nbytes[n][0] for n in names) + sens.fixed_bytes
    hi = sum(sens.nbytes[n][-1] for n in names) + sens.fixed_bytes
    combos = list(itertools.product(range(3), repeat=len(names)))

    def optimum(room):
        return min(sum(sens.delta[n][i] for n, i in zip(names, combo)) for combo in combos
                   if sum(sens.nbytes[n][i] for n, i in zip(names, combo)) + sens.fixed_bytes <= room)

    for frac in (0.2, 0.5, 0.8):
        room = int(lo + frac * (hi - lo))
        for units in (1 << 15, 64):
            choice = budget.allocate(sens, room, units)
            idx = {n: sens.candidates[n].index(f) for n, f in choice.items()}
            assert sum(sens.nbytes[n][i] for n, i in idx.items()) + sens.fixed_bytes <= room
            step = -(-(room - lo) // units)
            assert sum(sens.delta[n][i] for n, i in idx.items()) <= optimum(room - len(names) * step) + 1e-9


def test_allocate_refuses_a_budget_below_the_cheapest():
    sens = random_sensitivity(np.random.default_rng(0), 3, 2)
    with pytest.raises(PolicyError, match="below the smallest model"):
        budget.allocate(sens, sens.fixed_bytes + 1)


def test_auto_policy_yaml_round_trips(tmp_path):
    choice = {"blk.0.attn_q.weight": "Q4_K", "blk.0.ffn_down.weight": "Q6_K", "token_embd.weight": "Q8_0",
              "blk.1.attn_q.weight": "Q4_K"}
    policy = budget.auto_policy(choice, name="auto 4.5 bpw")
    path = budget.save_policy(policy, tmp_path / "auto.yaml", comment="predicted KL divergence 0.1")
    back = Policy.from_yaml(path)
    assert back == policy
    assert back.default == "Q4_K" and {r.name: r.format for r in back.rules} == {
        r"^blk\.0\.ffn_down\.weight$": "Q6_K", r"^token_embd\.weight$": "Q8_0"}


@pytest.mark.parametrize("text,value", [("3GB", 3_000_000_000), ("512 MiB", 512 * 2**20), ("2.5e9", 2_500_000_000)])
def test_parse_size(text, value):
    assert budget.parse_size(text) == value
