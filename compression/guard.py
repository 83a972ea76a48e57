"""The poisoning guard: what a peer accepts from its groupmates in an all-reduce.

hivemind averages whatever arrives. One peer whose gradients are NaN (a broken GPU, an fp16 overflow, malice) or
absurdly large would put NaN or garbage into every honest peer's update, and the same goes for the parameters of a
state-averaging round. Two places see foreign data, and both are guarded here:

* as a **reducer**, the parts each sender streams to us: ``GuardedTensorPartReducer`` waits until every sender's
  contribution to a part is in, then drops the ones that are non-finite (or carry a non-finite or negative weight) or
  whose RMS is more than ``max_norm_ratio`` times the reference, and averages the rest. The reference is our own
  contribution, the one thing we know is honest: the RMS of our part, but at least 1e-3 of the RMS of everything we
  average in this all-reduce (a part of ours that happens to be near zero must not make every honest peer's look
  absurd). A sender with one part dropped has the rest of its parts in this all-reduce dropped too: that floor lets
  -1e6x of a tiny part through (ConvNeXt's layer scale makes some parts of a gradient ~1e-4 of the rest), and
  tests/test_poisoning.py measured an ascent peer's parts at 35x-1e6x ours, some under the bar.
  Centered clipping of what passes (a ball around our own part, weights capped at a multiple of the median) is
  built and unit-tested but off by default (``CLIP_RATIO``, see there for why).
  A peer that reduces without contributing (an auxiliary peer, the state replica) uses the median of the senders' RMS
  as the reference (and their coordinate-wise median as the ball's center), which resists a minority of attackers but
  not one attacker in a pair.
* as a **sender**, the averaged deltas each reducer streams back: ``GuardedAllReduceRunner`` replaces a delta that is
  non-finite, or whose RMS is more than ``max_norm_ratio`` times the same reference, with zeros, so for that part we
  keep our own value instead of the reducer's (and, with clipping on, clips a smaller one to ``DELTA_CLIP_RATIO``);
  after one refused delta, the rest of that reducer's are refused too.

Dropping costs honest peers nothing but that contribution for that round; nobody is banned beyond the all-reduce,
because a peer whose fp16 step overflowed once is not an attacker. What is not guarded: a state *download* from a
malicious donor; a part under the 1000x bar before any of the sender's is refused (with clipping off it is averaged
in as it is); and a malicious reducer's deltas under the bar,
for the parts it reduces (1/n of the model). A refused delta also leaves the honest peers' copies of that part (under PowerSGD, their
P or Q factors) different until the next state-averaging round.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
from typing import Any, Callable, Optional, Sequence

import torch
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.utils.asyncio import as_aiter, azip
from hivemind.utils.timed_storage import get_dht_time

logger = logging.getLogger(__name__)

# An honest contribution differs from ours by the noise between two batches, a few times at most; 1000x is "absurd".
MAX_NORM_RATIO = 1e3

# Centered clipping, off by default (math.inf): a reducer may pull each contribution into a ball around its own part
# (radius CLIP_RATIO x the larger of our RMS and the contributions' median RMS), count a claimed weight as at most
# WEIGHT_RATIO x the median, and a sender may clip an averaged delta to DELTA_CLIP_RATIO x its RMS. With 2, 2 and 3
# it bounds a -100x peer among three or more to one honest peer pulling the other way (tests/test_guard.py), but it
# is not on: a radius of our own RMS alone cost ~2 points of MNIST parity, and with the median in it a group of four
# peers with uncorrelated gradients of different scales still got a mean off by a few percent (test_compression).
CLIP_RATIO = math.inf
DELTA_CLIP_RATIO = math.inf
WEIGHT_RATIO = math.inf

# The least reference, as a fraction of the RMS of all we average in one all-reduce: low enough that a 1e6x part of a
# small-scale tensor (a bias next to big factors) is still refused, high enough that a part of ours that is ~0 does
# not make every honest peer's look absurd.
FLOOR_FRACTION = 1e-3

RejectCallback = Callable[[int, int, str], None]  # (sender index, part index, reason)


def _rms(tensor: torch.Tensor) -> float:
    """Root mean square: comparable between parts of different sizes; inf or nan when any value is."""
    return float(torch.linalg.vector_norm(tensor.float())) / math.sqrt(max(tensor.numel(), 1))


def _total_rms(tensors: Sequence[torch.Tensor]) -> float:
    squares = sum(float(torch.linalg.vector_norm(t.float())) ** 2 for t in tensors)
    count = sum(t.numel() for t in tensors)
    return math.sqrt(squares / count) if count else 0.0


def clip_around(tensor: torch.Tensor, center: torch.Tensor, radius_rms: float) -> torch.Tensor:
    """``tensor`` moved into the ball of RMS radius ``radius_rms`` around ``center`` (unchanged if inside)."""
    distance = _rms(tensor - center)
    if distance <= radius_rms:
        return tensor
    return center + (tensor - center) * (radius_rms / distance)


def rejection_reason(rms: float, weight: float, reference: float, max_norm_ratio: float) -> Optional[str]:
    """Why a contribution with this RMS and weight is refused against ``reference`` (None: it is accepted)."""
    if not math.isfinite(rms):
        return "non-finite values"
    if not math.isfinite(weight) or weight < 0:
        return f"weight {weight}"
    if reference > 0 and rms > max_norm_ratio * reference:
        return f"RMS {rms / reference:.3g}x ours"
    return None


class GuardedTensorPartReducer(TensorPartReducer):
    """hivemind's reducer, averaging a part only over the contributions that pass ``rejection_reason``.

    hivemind adds each contribution to the accumulator as it arrives; here contributions wait in ``_pending`` until
    every live sender's is in (hivemind already holds every sender's future until then), because the reference, our
    own part, may arrive last. Memory: one part per sender, ``part_size_bytes`` each (512 KiB by default).
    """

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, own_sender_index: Optional[int],
                 max_norm_ratio: float = MAX_NORM_RATIO, on_reject: Optional[RejectCallback] = None,
                 floor: float = 0.0, clip_floor: float = 0.0, clip_ratio: float = CLIP_RATIO,
                 weight_ratio: float = WEIGHT_RATIO) -> None:
        """``floor``: the least reference RMS for refusing a part when we contribute (1e-3 of the RMS of all we
        average in this all-reduce); ``clip_floor``: the least for the clipping radius (that RMS itself), so a part of
        ours that is ~0 (a class absent from our batch) does not squash everyone else's to ~0."""
        self._pending: dict[int, tuple[torch.Tensor, float]] = {}  # before super().__init__, which resets it
        self._distrusted: set[int] = set()  # senders with a part refused in this all-reduce: the rest goes too
        self.own_sender_index, self.max_norm_ratio, self.on_reject = own_sender_index, max_norm_ratio, on_reject
        self.floor, self.clip_floor, self.clip_ratio, self.weight_ratio = floor, clip_floor, clip_ratio, weight_ratio
        self.clipped, self.contributions = 0, 0  # other senders' contributions clipped / accepted, this all-reduce
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        self._pending = {}
        super().reset_accumulators()

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        # hivemind's accumulate_part with the add deferred to check_current_part_finished
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1
        await self._wait_for_part(sender_index, part_index)
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self._pending[sender_index] = (tensor_part, weight)
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await current_part_future

    async def _wait_for_part(self, sender_index: int, part_index: int) -> None:
        while part_index > self.current_part_index:
            await asyncio.wait({self.current_part_future, asyncio.create_task(self.finished.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index

    def check_current_part_finished(self) -> None:
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from < self.num_current_senders:
            return
        self._reduce_pending()
        # every contribution refused (possible only without our own): an all-zero average moves nobody anywhere
        result = self.accumulator.div_(self.denominator) if self.denominator > 0 else self.accumulator
        self.current_part_future.set_result(result)
        self.reset_accumulators()

    def _reduce_pending(self) -> None:
        norms = {index: _rms(tensor) for index, (tensor, _) in self._pending.items()}
        own = self.own_sender_index if self.own_sender_index in self._pending else None
        reference = max(norms.get(own, math.nan), self.floor) if own is not None else math.nan
        if not (math.isfinite(reference) and reference > 0):
            finite = [norm for norm in norms.values() if math.isfinite(norm)]
            reference = statistics.median(finite) if finite else 0.0
        accepted = {}
        for index, (tensor, weight) in sorted(self._pending.items()):
            if index == own:
                reason = None if math.isfinite(norms[index]) else "non-finite values"
            elif index in self._distrusted:
                reason = "another of its parts was refused in this all-reduce"
            else:
                reason = rejection_reason(norms[index], weight, reference, self.max_norm_ratio)
            if reason is None:
                accepted[index] = (tensor, weight)
                continue
            if index != own:
                self._distrusted.add(index)
            if self.on_reject is not None:
                self.on_reject(index, self.current_part_index, reason)
        if not accepted:
            return
        # Clipping (off unless clip_ratio is finite; WEIGHT_RATIO's cap goes with it). The crowd leaves out weight-0
        # contributions (a state replica's zeros).
        crowd = [(t, norms[i]) for i, (t, w) in accepted.items() if w > 0]
        if not crowd or not math.isfinite(self.clip_ratio):
            return self._add(accepted)
        # The radius: CLIP_RATIO x the larger of our RMS and the crowd's median RMS. Our RMS alone clipped 5% of an
        # honest pair's contributions (parts where ours happened to be small) and cost ~2 points of MNIST parity;
        # the median moves only with a majority, so one attacker among three or more still meets the bound.
        median_rms = statistics.median(rms for _, rms in crowd)
        # The ball: around our own part, or (no part of our own, or a non-finite one) the coordinate-wise median.
        if own in accepted:
            center, radius = accepted[own][0], self.clip_ratio * max(norms[own], median_rms, self.clip_floor)
        else:
            center = torch.quantile(torch.stack([t.float() for t, _ in crowd]), 0.5, dim=0).to(crowd[0][0].dtype)
            radius = self.clip_ratio * median_rms
        max_weight = self.weight_ratio * statistics.median(w for _, w in accepted.values() if w > 0)
        bounded = {}
        for index, (tensor, weight) in accepted.items():
            if index != own and weight > 0:
                clipped = clip_around(tensor, center, radius)
                self.clipped += clipped is not tensor
                self.contributions += 1
                tensor, weight = clipped, min(weight, max_weight)
            bounded[index] = (tensor, weight)
        self._add(bounded)

    def finalize(self) -> None:
        if self.clipped and not self.finished.is_set():
            logger.info(f"clipped {self.clipped} of {self.contributions} groupmates' contributions to the parts we "
                        f"reduced (further than {self.clip_ratio:g}x the larger of our RMS and the median RMS from our own part)")
        super().finalize()

    def _add(self, contributions: dict[int, tuple[torch.Tensor, float]]) -> None:
        for tensor, weight in contributions.values():
            self.accumulator.add_(tensor, alpha=weight)
            self.denominator += weight


class GuardedAllReduceRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce with the guard on both sides: parts we reduce and deltas we receive."""

    def __init__(self, *, max_norm_ratio: float = MAX_NORM_RATIO, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_norm_ratio = max_norm_ratio
        self._rejected: dict[Any, set[str]] = {}  # peer -> reasons, logged once per peer and all-reduce
        self._distrusted: set[int] = set()  # reducers with an averaged part refused: the rest of theirs goes too
        # Our own part is the reference only when it carries weight: a state replica sends zeros with weight 0, and
        # like an auxiliary peer it judges the senders by their median instead.
        contributes = self.peer_id in self.sender_peer_ids and self.weight > 0
        own = self.sender_peer_ids.index(self.peer_id) if contributes else None
        self._clip_floor = _total_rms(self.tensor_part_container.local_tensors)
        self._floor = FLOOR_FRACTION * self._clip_floor
        # hivemind's reducer is replaced before it sees a part: mark it finished, or its __del__ warns "Reducer:
        # received 0.0% of input tensors" twice a round (once per PowerSGD phase) on every peer
        self.tensor_part_reducer.finished.set()
        self.tensor_part_reducer = GuardedTensorPartReducer(
            self.tensor_part_reducer.part_shapes, self.tensor_part_reducer.num_senders, own, max_norm_ratio,
            on_reject=lambda sender, _part, reason: self._note_rejection(self.sender_peer_ids[sender], reason),
            floor=self._floor, clip_floor=self._clip_floor,
        )
        # hivemind builds its TensorPartContainer inside __init__ and calls register_processed_part for every delta a
        # reducer streams back; wrapping that one bound method of this instance is the narrowest hook there is.
        self._register_delta = self.tensor_part_container.register_processed_part
        self.tensor_part_container.register_processed_part = self._register_checked_delta

    def _register_checked_delta(self, peer_index: int, part_index: int, delta: torch.Tensor) -> None:
        container = self.tensor_part_container
        peer_id = self.ordered_peer_ids[peer_index]
        if peer_id != self.peer_id and container.return_deltas:
            sent = container._input_parts_by_peer[peer_index][part_index][0]
            reason = self._delta_refusal(peer_index, sent, delta)
            if reason is not None:
                self._distrusted.add(peer_index)
                self._note_rejection(peer_id, f"averaged part: {reason}")
                delta = torch.zeros_like(sent)
            elif self.weight > 0:
                radius = DELTA_CLIP_RATIO * max(_rms(sent), self._clip_floor)
                delta = clip_around(delta, torch.zeros_like(delta), radius)
        self._register_delta(peer_index, part_index, delta)

    def _delta_refusal(self, peer_index: int, sent: torch.Tensor, delta: torch.Tensor) -> Optional[str]:
        """Why an averaged delta from this reducer is refused (None: it is applied).

        With weight 0 (a state replica) what we sent is no reference: zeros, or error feedback we do not contribute.
        Only non-finite deltas are refused then; the reducers' own guard still ran on their side.
        """
        delta_rms = _rms(delta)
        if self.weight <= 0 or not math.isfinite(delta_rms):
            return rejection_reason(delta_rms, 1.0, 0.0, self.max_norm_ratio)
        if peer_index in self._distrusted:
            return "another of its averaged parts was refused in this all-reduce"
        return rejection_reason(delta_rms, 1.0, max(_rms(sent), self._floor), self.max_norm_ratio)

    def _note_rejection(self, peer_id: Any, reason: str) -> None:
        reasons = self._rejected.setdefault(peer_id, set())
        if not reasons:
            logger.warning(f"dropped data from peer {peer_id} in an all-reduce ({reason}); its other parts are "
                           "checked too, and nothing is needed from you unless this repeats for your own peer id")
        reasons.add(reason)

    @property
    def rejected(self) -> dict[Any, set[str]]:
        """Peers whose parts or deltas this all-reduce dropped, with why."""
        return self._rejected


class GuardedAveragerMixin:
    """Put before a hivemind averager class so that all its all-reduces run through ``make_allreduce_runner``.

    Pinned to hivemind 1.1.12: ``_run_allreduce_inplace_`` is ``DecentralizedAverager``'s, with the runner built by
    a method that subclasses (the traffic counters) can extend.
    """

    def make_allreduce_runner(self, **kwargs: Any) -> AllReduceRunner:
        return GuardedAllReduceRunner(**kwargs)

    async def _run_allreduce_inplace_(self, tensors: Sequence[torch.Tensor], group_info: GroupInfo,
                                      group_id: Optional[bytes] = None, **kwargs: Any) -> None:
        group_id = group_info.group_id if group_id is None else group_id
        runner = self.make_allreduce_runner(p2p=self._p2p, servicer_type=type(self), prefix=self.prefix,
                                            tensors=tensors, group_id=group_id, ordered_peer_ids=group_info.peer_ids,
                                            **kwargs)
        assert group_id in self._running_groups, f"Group id {group_id} was not registered in _register_allreduce_group"
        self._running_groups[group_id].set_result(runner)

        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, update in azip(as_aiter(*tensors), runner):
                tensor.add_(update, alpha=self._averaging_alpha)
                self.last_updated = get_dht_time()
            # hivemind sets this per tensor; each set wakes _declare_for_download_periodically, which re-stores the
            # peer in the DHT's download key: a store per tensor, ~2.7 KB on the wire each (bench/RESULTS.md).
            # Once per all-reduce says the same.
            self._state_updated.set()
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")


class GuardedTrainingStateAverager(GuardedAveragerMixin, TrainingStateAverager):
    """hivemind's state averager (parameters, optimizer statistics, the state download) with the guard on.

    hivemind names RPC handlers after the class, so every peer of a run (and the coordinator's state download) must
    use this class: ``{prefix}::GuardedTrainingStateAverager.rpc_download_state`` and so on.
    """

    # ServicerBase caches handlers and the stub type on the first class that asks; ours must collect its own
    _rpc_handlers = None
    _stub_type = None

    def get_current_state(self) -> tuple[dict, list[torch.Tensor], list]:
        """hivemind's state with private copies of the tensors, for a groupmate's state download.

        hivemind hands this state to its averager process by pickling it in a background thread, and torch's pickler
        moves each storage that is not yet shared into shared memory (``_share_filename_cpu_``): it swaps the live
        parameter's memory while the training thread may be writing to it (an optimizer step, or
        ``load_state_from_peers``' copy). That use-after-free was a SIGSEGV of an honest peer, caught by faulthandler
        with one thread in ``_share_filename_cpu_`` and the main thread in ``load_state_from_peers``. Copies taken
        under the averaged tensors' lock are ours alone to move. Costs one copy of the state per download served.
        """
        metadata, tensors, infos = super().get_current_state()
        with torch.no_grad(), self.lock_averaged_tensors:
            tensors = [tensor.detach().clone() for tensor in tensors]
        return metadata, tensors, infos
