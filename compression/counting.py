"""Counting what hivemind puts on the wire, without patching hivemind's modules.

Gradients: ``CountingAveragerMixin`` swaps hivemind's ``AllReduceRunner`` for ``CountingAllReduceRunner``, which sees
every ``averaging_pb2.AveragingData`` message of an all-reduce in both directions:

* sent as a sender: the parts this peer streams to each reducer (wrapped request stream of the peer stub);
* received as a sender: the averaged deltas each reducer streams back (wrapped response stream);
* received as a reducer: the parts groupmates stream to us (wrapped request stream of ``rpc_aggregate_part``);
* sent as a reducer: the averaged deltas we stream back (wrapped responses of ``rpc_aggregate_part``).

Per message it adds ``msg.ByteSize()`` (the protobuf encoding: codec buffer + shape/dtype/codec/weight fields, the
group id on the first message) to ``grad_bytes_*``, ``len(tensor_part.buffer)`` to ``grad_payload_bytes_*`` and one
to ``grad_parts_*``. Not counted: the part of our own share that never leaves the process, libp2p framing
(varint length prefixes, yamux/noise/TCP headers), matchmaking (``rpc_join_group``), DHT traffic and state downloads.
A round is a completed ``_aggregate_with_group`` (for PowerSGD that is both its P and Q all-reduces); bytes of failed
rounds are counted, the round is not.

State: ``hivemind.Optimizer`` builds its ``TrainingStateAverager`` itself, so only the codec can be hooked
(``CountingCompression``). It sees the parts this peer encodes as a sender (``runtime_pb2.Tensor.ByteSize()``); the
reducer's replies are encoded by hivemind from the codec enum and received parts are decoded by enum, so neither is
visible and ``state_bytes_received`` stays 0. In a pair, the sender half is half of what the peer sends per round.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Callable, Optional

import torch
from hivemind.averaging.group_info import GroupInfo
from hivemind.compression import CompressionBase, CompressionInfo
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2

from .counters import TrafficCounters, butterfly_bytes_sent, fp32_bytes
from .guard import GuardedAllReduceRunner, GuardedAveragerMixin

logger = logging.getLogger(__name__)

_NOT_SEEN = object()


async def _counted(stream: AsyncIterator[averaging_pb2.AveragingData], record: Callable[[Any], None]):
    async for message in stream:
        record(message)
        yield message


class _CountingStub:
    """Wraps a peer stub so that the parts we stream to a reducer and its replies are counted."""

    def __init__(self, stub: Any, runner: CountingAllReduceRunner) -> None:
        self._stub, self._runner = stub, runner

    async def rpc_aggregate_part(self, requests: AsyncIterator[averaging_pb2.AveragingData], *args, **kwargs):
        responses = await self._stub.rpc_aggregate_part(_counted(requests, self._runner.record_sent), *args, **kwargs)
        return _counted(responses, self._runner.record_received)


class CountingAllReduceRunner(GuardedAllReduceRunner):
    """hivemind's butterfly all-reduce with the poisoning guard, counting every message it exchanges with groupmates."""

    def __init__(self, *, traffic: TrafficCounters, **kwargs) -> None:
        super().__init__(**kwargs)
        self.traffic = traffic

    def record_sent(self, message: averaging_pb2.AveragingData) -> None:
        self.traffic.add(grad_bytes_sent=message.ByteSize(), grad_payload_bytes_sent=len(message.tensor_part.buffer),
                         grad_parts_sent=int(bool(message.tensor_part.buffer)))

    def record_received(self, message: averaging_pb2.AveragingData) -> None:
        self.traffic.add(grad_bytes_received=message.ByteSize(),
                         grad_payload_bytes_received=len(message.tensor_part.buffer),
                         grad_parts_received=int(bool(message.tensor_part.buffer)))

    def _get_peer_stub(self, peer: PeerID) -> Any:
        return _CountingStub(super()._get_peer_stub(peer), self)

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for message in super().rpc_aggregate_part(_counted(stream, self.record_received), context):
            self.record_sent(message)
            yield message


class CountingAveragerMixin(GuardedAveragerMixin):
    """Put before a hivemind gradient averager class to count its all-reduce traffic into ``traffic``.

    Its all-reduces run through ``CountingAllReduceRunner``, which is guarded (``guard.py``) as well as counted.
    """

    # ServicerBase caches RPC handlers and the stub type on the first class that asks; an inherited cache would make
    # our stubs call the base class's handler names while we register ours, so each class collects its own.
    _rpc_handlers = None
    _stub_type = None

    def __init__(self, *args, traffic: TrafficCounters, **kwargs) -> None:
        # set before super().__init__: with start=True hivemind forks the averager process inside it
        self._traffic = traffic
        self._round_layout: Optional[tuple] = None
        super().__init__(*args, **kwargs)

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs) -> Any:
        self._round_layout = None
        gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        reference = 0
        if self._round_layout is not None:
            reference = butterfly_bytes_sent(fp32_bytes(self._averaged_tensors), *self._round_layout)
        self._traffic.add(grad_rounds=1, grad_fp32_reference_bytes=reference)
        return gathered

    def make_allreduce_runner(self, **kwargs: Any) -> CountingAllReduceRunner:
        runner = CountingAllReduceRunner(traffic=self._traffic, **kwargs)
        if self._round_layout is None:  # PowerSGD runs two all-reduces per round with the same group and fractions
            own_index = list(kwargs["ordered_peer_ids"]).index(self.peer_id)
            self._round_layout = (
                runner.peer_fractions, own_index, len(runner.sender_peer_ids), self.peer_id in runner.sender_peer_ids
            )
        return runner


class CountingCompression(CompressionBase):
    """A codec wrapper that counts the messages it encodes (the sender side of an all-reduce, or state served).

    Also counts all-reduces when ``rounds_field`` is given: hivemind's ``TensorPartContainer`` asks
    ``estimate_compression_ratio`` once per tensor, in order, for every all-reduce, so the first tensor coming round
    again marks a new all-reduce (started, not necessarily finished).
    """

    def __init__(self, inner: CompressionBase, traffic: TrafficCounters, bytes_field: str,
                 rounds_field: Optional[str] = None) -> None:
        self.inner, self.traffic = inner, traffic
        self.bytes_field, self.rounds_field = bytes_field, rounds_field
        self._first_key: Any = _NOT_SEEN  # per process: only the averager child process ever asks

    @property
    def compression_type(self) -> runtime_pb2.CompressionType:
        return self.inner.compression_type

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        message = self.inner.compress(tensor, info, allow_inplace)
        self.traffic.add(**{self.bytes_field: message.ByteSize()})
        return message

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        return self.inner.extract(serialized_tensor)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        if self.rounds_field is not None and info.part_index == 0:
            if self._first_key is _NOT_SEEN:
                self._first_key = info.key
            if info.key == self._first_key:
                self.traffic.add(**{self.rounds_field: 1})
        return self.inner.estimate_compression_ratio(info)

    def __repr__(self) -> str:
        return f"CountingCompression({self.inner!r}, {self.bytes_field})"
