"""The poisoning guard: what a peer accepts from its groupmates in an all-reduce, and from a state donor.

hivemind averages whatever arrives. One peer whose gradients are NaN (a broken GPU, an fp16 overflow, malice) or
absurdly large would put NaN or garbage into every honest peer's update, and the same goes for the parameters of a
state-averaging round. Two places of an all-reduce see foreign data, and both are guarded here:

* as a **reducer**, the parts each sender streams to us: ``GuardedTensorPartReducer`` waits until every sender's
  contribution to a part is in, then drops the ones that are non-finite (or carry a non-finite or negative weight) or
  whose RMS is more than ``max_norm_ratio`` times the reference, and averages the rest. The reference is our own
  contribution, the one thing we know is honest: the RMS of our part, but at least 1e-3 of the RMS of everything we
  average in this all-reduce (a part of ours that happens to be near zero must not make every honest peer's look
  absurd). A sender with one part dropped has the rest of its parts in this all-reduce dropped too: that floor lets
  -1e6x of a tiny part through (ConvNeXt's layer scale makes some parts of a gradient ~1e-4 of the rest), and
  tests/test_poisoning.py measured an ascent peer's parts at 35x-1e6x ours, some under the bar.
  A peer that reduces without contributing (an auxiliary peer, the state replica) uses the median of the senders' RMS
  as the reference, which resists a minority of attackers but not one attacker in a pair.
* as a **sender**, the averaged deltas each reducer streams back: ``GuardedAllReduceRunner`` replaces a delta that is
  non-finite, or whose RMS is more than ``max_norm_ratio`` times the same reference, with zeros, so for that part we
  keep our own value instead of the reducer's; after one refused delta, the rest of that reducer's are refused too.

Dropping costs honest peers nothing but that contribution for that round; nobody is banned beyond the all-reduce,
because a peer whose fp16 step overflowed once is not an attacker. What is not guarded: a part under the 1000x bar
before any of the sender's is refused (it is averaged in as it is); and a malicious reducer's
deltas under the bar, for the parts it reduces (1/n of the model). A refused delta also leaves the honest peers'
copies of that part (under PowerSGD, their P or Q factors) different until the next state-averaging round.

A third place is the state **download** a joiner (or a peer that fell behind) makes from one donor:
``CheckedDownloadMixin`` lets the peer refuse it before hivemind applies it (the peer scores it on its own data),
and asks the next donor. A state that scores about as well as ours, but was poisoned subtly, is not caught.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.averager import DecentralizedAverager
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import PeerID
from hivemind.utils.asyncio import as_aiter, azip
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

from .matchmaking import pace_leader_search

logger = logging.getLogger(__name__)

# An honest contribution differs from ours by the noise between two batches, a few times at most; 1000x is "absurd".
MAX_NORM_RATIO = 1e3

# Centered clipping of what passes the bar (a ball around our own part, claimed weights capped) was built and measured
# in 714e0cc-8804831 and removed: a radius of our own RMS cost ~2 points of MNIST parity, and with the median RMS in
# it a group of four honest peers with uncorrelated gradients no longer got their exact mean (bench/RESULTS.md).

# The least reference, as a fraction of the RMS of all we average in one all-reduce: low enough that a 1e6x part of a
# small-scale tensor (a bias next to big factors) is still refused, high enough that a part of ours that is ~0 does
# not make every honest peer's look absurd.
FLOOR_FRACTION = 1e-3

RejectCallback = Callable[[int, int, str], None]  # (sender index, part index, reason)
StateCheck = Callable[[Sequence[torch.Tensor]], Optional[str]]  # downloaded parameters -> why refused (None: fine)

# Donors asked per state download before giving up until the next one: each refused state cost a whole download.
MAX_DONORS_TRIED = 3
# Seconds a refused donor is left out of our downloads. Not for ever: a peer whose state went bad by a bug may have
# reloaded a good one since, and a false refusal (our batch, not its state, was odd) should not cost it for good.
# Asking a still-bad donor again costs one download per period, and only while we are downloading at all.
REFUSAL_TTL = 600.0


def _rms(tensor: torch.Tensor) -> float:
    """Root mean square: comparable between parts of different sizes; inf or nan when any value is."""
    return float(torch.linalg.vector_norm(tensor.float())) / math.sqrt(max(tensor.numel(), 1))


def _total_rms(tensors: Sequence[torch.Tensor]) -> float:
    squares = sum(float(torch.linalg.vector_norm(t.float())) ** 2 for t in tensors)
    count = sum(t.numel() for t in tensors)
    return math.sqrt(squares / count) if count else 0.0


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
                 floor: float = 0.0) -> None:
        """``floor``: the least reference RMS for refusing a part when we contribute (1e-3 of the RMS of all we
        average in this all-reduce), so a part of ours that is ~0 does not make everyone else's look absurd."""
        self._pending: dict[int, tuple[torch.Tensor, float]] = {}  # before super().__init__, which resets it
        self._distrusted: set[int] = set()  # senders with a part refused in this all-reduce: the rest goes too
        self.own_sender_index, self.max_norm_ratio, self.on_reject = own_sender_index, max_norm_ratio, on_reject
        self.floor = floor
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
        for index, (tensor, weight) in sorted(self._pending.items()):
            if index == own:
                reason = None if math.isfinite(norms[index]) else "non-finite values"
            elif index in self._distrusted:
                reason = "another of its parts was refused in this all-reduce"
            else:
                reason = rejection_reason(norms[index], weight, reference, self.max_norm_ratio)
            if reason is None:
                self.accumulator.add_(tensor, alpha=weight)
                self.denominator += weight
                continue
            if index != own:
                self._distrusted.add(index)
            if self.on_reject is not None:
                self.on_reject(index, self.current_part_index, reason)


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
        self._floor = FLOOR_FRACTION * _total_rms(self.tensor_part_container.local_tensors)
        # hivemind's reducer is replaced before it sees a part: mark it finished, or its __del__ warns "Reducer:
        # received 0.0% of input tensors" twice a round (once per PowerSGD phase) on every peer
        self.tensor_part_reducer.finished.set()
        self.tensor_part_reducer = GuardedTensorPartReducer(
            self.tensor_part_reducer.part_shapes, self.tensor_part_reducer.num_senders, own, max_norm_ratio,
            on_reject=lambda sender, _part, reason: self._note_rejection(self.sender_peer_ids[sender], reason),
            floor=self._floor,
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
    a method that subclasses (the traffic counters) can extend. Being every averager's first base, it also gives
    matchmaking its paced leader search (``compression/matchmaking.py``) before the first round.
    """

    async def _step(self, **kwargs: Any) -> Any:
        try:  # runs in the averager's process, where _matchmaking lives
            pace_leader_search(self._matchmaking)
        except Exception as e:  # hivemind's step() waits for _step without a timeout: never fail before it
            logger.warning(f"matchmaking keeps hivemind's unpaced leader search: {e!r}")
        return await super()._step(**kwargs)

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


class CheckedDownloadMixin(DecentralizedAverager):
    """A state download that ``state_check`` may refuse before hivemind applies it; a refused donor is not asked again
    for ``refusal_ttl`` seconds.

    hivemind downloads from the donor with the highest priority and applies what it gets. A peer whose parameters
    went bad, by malice or by a bug, would hand its state to every joiner: measured in test_poisoning, honest peers
    that loaded the -1e6x peer's state went from loss 3.9 to 7.0 at once. The check runs in the main process (the
    peer's: a loss on its own data, see ``Peer.check_downloaded_state``); the refused donors travel to the averager
    process with each download request, which leaves them out of the donor list and names the donor it used.

    Goes after ``TrainingStateAverager`` in the bases (its ``load_state_from_peers`` applies what ours returns).
    Pinned to hivemind 1.1.12: ``DecentralizedAverager.load_state_from_peers`` sends ``_load_state_from_peers`` down
    the pipe, which reads the donors from ``{prefix}.all_averagers`` and asks each through ``get_stub``.
    """

    state_check: Optional[StateCheck] = None
    refusal_ttl: float = REFUSAL_TTL

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._refused_donors: dict[str, float] = {}  # main process; base58 peer id -> time.monotonic() of refusal
        super().__init__(*args, **kwargs)

    @property
    def refused_donors(self) -> list[str]:
        """The donors left out of our downloads now (refused less than ``refusal_ttl`` seconds ago)."""
        now = time.monotonic()
        self._refused_donors = {peer: at for peer, at in self._refused_donors.items() if now - at < self.refusal_ttl}
        return list(self._refused_donors)

    def load_state_from_peers(self, wait: bool = True, timeout: Optional[float] = None):
        """DecentralizedAverager's download, checked; always waits (TrainingStateAverager, our only caller, does)."""
        for _ in range(MAX_DONORS_TRIED):
            future = MPFuture()
            self._outer_pipe.send(("_load_state_from_peers", [],
                                   dict(timeout=timeout, future=future, refused=tuple(self.refused_donors))))
            loaded = future.result(timeout=timeout)
            if loaded is None or self.state_check is None:
                return loaded
            metadata, tensors = loaded
            donor = metadata.pop("_donor", None)
            num_parameters = sum(len(group["params"]) for group in self.optimizer.param_groups)
            why = self.state_check(tensors[:num_parameters])
            if why is None:
                return loaded
            logger.warning(f"refused the state downloaded from peer {donor}: {why}; asking another peer")
            if donor is None:
                return None
            self._refused_donors[donor] = time.monotonic()
        return None

    async def _load_state_from_peers(self, future: MPFuture, timeout: Optional[float] = None,
                                     refused: Sequence[str] = ()) -> None:
        asked: list[PeerID] = []  # the donors whose rpc_download_state was called, in order
        real_dht, real_get_stub = self.dht, self.get_stub

        def get_stub(p2p, peer, **kwargs):  # hivemind asks each donor in turn through a stub from get_stub
            return _RecordingStub(real_get_stub(p2p, peer, **kwargs), peer, asked)

        key = f"{self._matchmaking.group_key_manager.prefix}.all_averagers"
        found = real_dht.get(key, latest=True)  # a blocking read, as hivemind's own download makes
        if refused and found is not None and isinstance(found.value, dict):
            dropped = {PeerID.from_base58(peer).to_bytes() for peer in refused}
            kept = {subkey: value for subkey, value in found.value.items() if subkey not in dropped}
            found = ValueWithExpiration(kept, found.expiration_time) if kept else None
        self.dht = FixedDhtRead(real_dht, key, found)
        self.get_stub = get_stub
        try:
            await super()._load_state_from_peers(_NamingDonor(future, asked), timeout=timeout)
        finally:
            self.dht = real_dht
            del self.get_stub


class FixedDhtRead:
    """An averager's DHT handle with one key's read replaced by a fixed value (everything else passes through).

    How a download is pointed at chosen donors: hivemind's ``_load_state_from_peers`` reads them from
    ``{prefix}.all_averagers`` through ``self.dht``. Used here (refused donors left out) and by peer/access.py
    (uncertified donors left out).
    """

    def __init__(self, dht: Any, key: str, value: Optional[ValueWithExpiration]) -> None:
        self._dht, self._key, self._value = dht, key, value

    def get(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        if key == self._key:
            return self._value
        return self._dht.get(key, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dht, name)


class _RecordingStub:
    """A stub that notes its peer when its ``rpc_download_state`` is called (other coroutines' stubs pass through)."""

    def __init__(self, stub: Any, peer: PeerID, asked: list[PeerID]) -> None:
        self._stub, self._peer, self._asked = stub, peer, asked

    def __getattr__(self, name: str) -> Any:
        if name == "rpc_download_state":
            self._asked.append(self._peer)
        return getattr(self._stub, name)


class _NamingDonor:
    """The download's future, adding to the metadata which peer the state came from (we set it, not the donor)."""

    def __init__(self, future: MPFuture, asked: list[PeerID]) -> None:
        self._future, self._asked = future, asked

    def set_result(self, result: Any) -> None:
        if result is not None and isinstance(result[0], dict):
            metadata, tensors = result
            result = ({**metadata, "_donor": str(self._asked[-1]) if self._asked else None}, tensors)
        self._future.set_result(result)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._future, name)


class GuardedTrainingStateAverager(GuardedAveragerMixin, TrainingStateAverager, CheckedDownloadMixin):
    """hivemind's state averager (parameters, optimizer statistics, the state download) with the guard on, and a
    state download that the peer checks before it is applied (``CheckedDownloadMixin``).

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
