"""The poisoning guard's rules on real hivemind reducers: honest parts averaged, poisoned ones dropped."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from convforever.compression.guard import GuardedTensorPartReducer, rejection_reason


def reduce(parts: dict[int, list[torch.Tensor]], own: int | None, weights: dict[int, float] | None = None,
           floor: float = 0.0):
    """Feed every sender's parts to one reducer concurrently, in an order that puts our own part last."""
    num_senders = len(parts)
    rejected: list[tuple[int, int, str]] = []

    async def main():
        reducer = GuardedTensorPartReducer([p.shape for p in parts[0]], num_senders, own,
                                           on_reject=lambda *args: rejected.append(args), floor=floor)

        async def sender(index: int):
            results = []
            for part_index, part in enumerate(parts[index]):
                if index == own:
                    await asyncio.sleep(0.01)  # the reference arrives after the others
                weight = (weights or {}).get(index, 1.0)
                results.append(await reducer.accumulate_part(index, part_index, part, weight=weight))
            return results

        return await asyncio.gather(*(sender(i) for i in sorted(parts)))

    return asyncio.run(main()), rejected


def test_nan_and_huge_contributions_are_dropped_and_honest_ones_averaged():
    torch.manual_seed(0)
    honest = [[torch.randn(100), torch.randn(30)] for _ in range(2)]
    nan = [torch.full((100,), math.nan), torch.randn(30)]
    huge = [torch.randn(100) * 1e6, torch.randn(30) * 1e6]
    results, rejected = reduce({0: honest[0], 1: honest[1], 2: nan, 3: huge}, own=0)

    expected = [(honest[0][i] + honest[1][i]) / 2 for i in range(2)]  # neither NaN nor 1e6x counts
    for per_sender in results:  # every sender, the attackers included, gets the same average back
        assert torch.allclose(per_sender[0], expected[0])
        assert torch.allclose(per_sender[1], expected[1])  # the NaN peer's finite second part goes too
    assert {(sender, part) for sender, part, _ in rejected} == {(2, 0), (2, 1), (3, 0), (3, 1)}
    reasons = {(sender, part): reason for sender, part, reason in rejected}
    assert "non-finite" in reasons[2, 0] and "x ours" in reasons[3, 0]
    assert "another of its parts" in reasons[2, 1]


def test_an_attacker_cannot_hide_in_the_tiny_parts_of_a_gradient():
    """Measured in test_poisoning: ConvNeXt's layer scale (1e-6 at init) makes some parts of an honest gradient ~1e-4
    of the rest, so -1e6x of such a part is under the bar against our floor (1e-3 of all we average), and the ascent
    peer's parts came in at 35x-1e6x ours. Once one of its parts is refused, the rest of the all-reduce goes too.
    What still passes: a tiny part before the first refused one (part 0 here)."""
    torch.manual_seed(5)
    scales = [1e-4, 1.0, 1e-4, 1e-4]  # per part: a tiny layer, a normal one, two tiny ones
    honest = [[torch.randn(100) * scale for scale in scales] for _ in range(2)]
    ascent = [-1e6 * part for part in honest[1]]
    results, rejected = reduce({0: honest[0], 1: honest[1], 2: ascent}, own=0, floor=1.0)
    for i in (1, 2, 3):
        assert torch.allclose(results[0][i], (honest[0][i] + honest[1][i]) / 2)
    reasons = {(sender, part): reason for sender, part, reason in rejected}
    assert set(reasons) == {(2, 1), (2, 2), (2, 3)}
    assert "RMS" in reasons[2, 1] and "another of its parts" in reasons[2, 2]


def test_an_honest_peer_whose_part_is_tiny_is_not_refused():
    """The same tiny-then-normal parts from an honest groupmate at a few times our scale: all averaged."""
    torch.manual_seed(6)
    scales = [1e-4, 1.0, 1e-4]
    parts = {0: [torch.randn(100) * scale for scale in scales], 1: [torch.randn(100) * 3 * scale for scale in scales]}
    results, rejected = reduce(parts, own=0, floor=1e-3)
    assert not rejected
    for i in range(3):
        assert torch.allclose(results[0][i], (parts[0][i] + parts[1][i]) / 2)


def test_a_near_zero_part_of_ours_does_not_make_honest_parts_look_absurd():
    """Our part of one layer can be ~0 while the others' are not: the RMS of all we average is the least reference."""
    torch.manual_seed(3)
    parts = {0: [torch.randn(64) * 1e-9], 1: [torch.randn(64)], 2: [torch.randn(64) * 1e6]}
    results, rejected = reduce(parts, own=0, floor=1e-3)
    assert torch.allclose(results[0][0], (parts[0][0] + parts[1][0]) / 2)
    assert [sender for sender, _, _ in rejected] == [2]


def test_without_our_own_part_the_median_is_the_reference():
    torch.manual_seed(1)
    parts = {i: [torch.randn(50)] for i in range(3)}
    parts[3] = [torch.randn(50) * 1e6]
    results, rejected = reduce(parts, own=None)
    assert torch.allclose(results[0][0], (parts[0][0] + parts[1][0] + parts[2][0]) / 3)
    assert [(sender, part) for sender, part, _ in rejected] == [(3, 0)]


def test_a_negative_or_nan_weight_is_refused_and_weights_still_weigh():
    torch.manual_seed(2)
    parts = {i: [torch.randn(20)] for i in range(3)}
    results, rejected = reduce(parts, own=0, weights={0: 1.0, 1: 3.0, 2: -5.0})
    assert torch.allclose(results[0][0], (parts[0][0] + 3 * parts[1][0]) / 4)
    assert [sender for sender, _, _ in rejected] == [2]


@pytest.mark.parametrize("norm, weight, reference, refused", [
    (1.0, 1.0, 1.0, False), (999.0, 1.0, 1.0, False), (1001.0, 1.0, 1.0, True), (math.inf, 1.0, 1.0, True),
    (math.nan, 1.0, 1.0, True), (5.0, math.inf, 1.0, True), (5.0, 1.0, 0.0, False),
])
def test_rejection_rule(norm, weight, reference, refused):
    assert (rejection_reason(norm, weight, reference, 1e3) is not None) == refused


def test_the_guard_averages_whatever_passes_the_bar_exactly():
    """No clipping (compression/guard.py says why): a -100x part is averaged in as it is, so honest means stay exact."""
    torch.manual_seed(4)
    parts = {0: [torch.randn(200)], 1: [torch.randn(200)], 2: [-100 * torch.randn(200)]}
    results, rejected = reduce(parts, own=0, weights={0: 1.0, 1: 1.0, 2: 5.0})
    assert torch.allclose(results[0][0], (parts[0][0] + parts[1][0] + 5 * parts[2][0]) / 7) and not rejected


def test_a_state_replica_averages_honest_parts_whole():
    """The replica contributes zeros with weight 0 and no reference of its own: the two honest parts come back
    averaged exactly."""
    torch.manual_seed(6)
    parts = {0: [torch.randn(80)], 1: [torch.randn(80) * 3], 2: [torch.zeros(80)]}
    results, rejected = reduce(parts, own=None, weights={0: 1.0, 1: 1.0, 2: 0.0})
    assert torch.allclose(results[0][0], (parts[0][0] + parts[1][0]) / 2)
    assert not rejected


def test_a_non_finite_part_of_our_own_is_dropped_and_the_others_averaged():
    torch.manual_seed(7)
    parts = {0: [torch.full((40,), math.nan)], 1: [torch.randn(40)], 2: [torch.randn(40)]}
    results, rejected = reduce(parts, own=0)
    assert torch.allclose(results[1][0], (parts[1][0] + parts[2][0]) / 2)
    assert [sender for sender, _, _ in rejected] == [0]
