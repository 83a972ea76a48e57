"""PowerSGD with flat buffers: each all-reduce phase sends one buffer per segment, cut once per peer.

hivemind's ``TensorPartContainer`` cuts parts per tensor, so PowerSGD's ~240 small factors and whole tensors become
~240 messages per round, and under 8-bit each carries a ~1 KiB codebook: at rank 4 a quarter of the factor bytes were
codebooks. Here the P factors travel as one flat buffer, and the Q factors plus the tensors PowerSGD leaves whole as two
more, each cut exactly where hivemind's load balancing puts the boundary between two peers' shares. Every peer then
reduces one contiguous chunk per segment, and a sender ships one message (one codebook) per segment and reducer.

The maths is hivemind 1.1.12's ``PowerSGDGradientAverager._aggregate_with_group`` unchanged: error feedback in
``_ms``, the warm-started Q in ``_qs`` (both still per tensor, so state download and ``_reseed_warm_start`` work as
before); only how the tensors are handed to ``_run_allreduce_inplace_`` differs.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

import numpy as np
import torch
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.compression import CompressionInfo, TensorRole
from hivemind.optim.power_sgd_averager import AllReducePhases, PowerSGDGradientAverager
from hivemind.utils import get_logger
from hivemind.utils.asyncio import enter_asynchronously
from hivemind.utils.math import get_flatten_greedy_dims, orthogonalize_

from .codecs import FACTORS, WHOLE

logger = get_logger(__name__)

Chunk = tuple[int, int, int]  # (segment index, start, stop) within that segment's flat buffer


def cut_at_pivots(lengths: Sequence[int], peer_fractions: Sequence[float]) -> list[Chunk]:
    """Cut consecutive segments of ``lengths`` values where each peer's share of the concatenation begins.

    The pivots are ``TensorPartContainer``'s own (same formula, same rounding), so each chunk lies inside one peer's
    share and hivemind assigns it whole to that peer. Every peer computes the same chunks from the same lengths and
    fractions, which the reducers rely on (they expect the part shapes they cut themselves). Empty segments and the
    empty shares of client-mode peers yield no chunk.
    """
    total = int(sum(lengths))
    if total == 0:
        return []
    pivots = (np.cumsum(peer_fractions) / np.sum(peer_fractions) * total).astype(np.int64)
    pivots[-1] = total
    chunks: list[Chunk] = []
    offset = 0
    for segment, length in enumerate(lengths):
        cuts = sorted({int(p) - offset for p in pivots if offset < p < offset + length})
        bounds = [0, *cuts, length]
        chunks.extend((segment, start, stop) for start, stop in zip(bounds[:-1], bounds[1:], strict=True) if stop > start)
        offset += length
    return chunks


def _flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors]) if tensors else torch.zeros(0)


def _unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset:offset + tensor.numel()].view(tensor.shape))
        offset += tensor.numel()


def _normalize_columns_(q: torch.Tensor) -> None:
    """Scale the warm-started Q's columns to unit norm before P = M Q: the same P after orthogonalization, better
    conditioned for 8-bit.

    A warm-started column is q_j = M^T p_j ~ sigma_j v_j, so P = M Q has columns ~ sigma_j**2 u_j and one 4096-value
    block's absmax, set by the first column, leaves the last few levels for the others. Unit columns give
    sigma_j u_j. Positive column scales do not change what Gram-Schmidt (``orthogonalize_``) returns, so in exact
    arithmetic the round is unchanged; Q is recomputed from M and P right after, so nothing else sees the scaling.
    """
    q.div_(q.norm(dim=0, keepdim=True).clamp_min(1e-30))


class FlatPowerSGDGradientAverager(PowerSGDGradientAverager):
    """hivemind's PowerSGD averager that all-reduces flat per-segment buffers instead of tensor after tensor.

    Needs a codec that tells segments apart by key (``codecs.SegmentCompression``) to send factors and whole
    tensors differently; any other codec applies to both.
    """

    async def _allreduce_segments(
        self, segments: Sequence[tuple[str, Sequence[torch.Tensor]]], group_info: GroupInfo, group_id: bytes,
        peer_fractions: Sequence[float], **kwargs: Any,
    ) -> None:
        """All-reduce every segment's tensors as one flat buffer cut at the peers' shares; write averages back."""
        flats = [_flatten(tensors) for _, tensors in segments]
        chunks = cut_at_pivots([flat.numel() for flat in flats], peer_fractions)
        views = [flats[segment][start:stop] for segment, start, stop in chunks]
        infos = [
            CompressionInfo.from_tensor(view, key=(segments[segment][0], index), role=TensorRole.GRADIENT)
            for index, (view, (segment, _, _)) in enumerate(zip(views, chunks, strict=True))
        ]
        kwargs["tensor_infos"] = infos
        await self._run_allreduce_inplace_(views, group_info, group_id, peer_fractions=peer_fractions, **kwargs)
        for flat, (_, tensors) in zip(flats, segments, strict=True):
            _unflatten_into(flat, tensors)

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any) -> Any:
        """hivemind's PowerSGD round (see its ``_aggregate_with_group``), with both phases sent as flat segments."""
        try:
            bandwidths, mode_ids, user_gathered_bytes = zip(*map(self.serializer.loads, group_info.gathered), strict=True)
            user_gathered = dict(zip(group_info.peer_ids, map(self.serializer.loads, user_gathered_bytes), strict=True))
            modes = tuple(map(AveragingMode, mode_ids))
            download_bandwidths = [
                bandwidth if mode != AveragingMode.CLIENT else 0.0 for bandwidth, mode in zip(bandwidths, modes, strict=True)
            ]
            peer_fractions = await asyncio.get_event_loop().run_in_executor(
                None, load_balance_peers, self.total_size, download_bandwidths, min_vector_size
            )

            async with enter_asynchronously(self.get_tensors()) as averaged_grads:
                via_sgd = [g for i, g in enumerate(averaged_grads) if i not in self._uncompressed_gradients_indexes]
                whole = [g for i, g in enumerate(averaged_grads) if i in self._uncompressed_gradients_indexes]
                for grad, m in zip(via_sgd, self._ms, strict=True):
                    m.add_(grad.to(m.device))  # error feedback: what earlier rounds missed rides along

                ps = [torch.zeros((get_flatten_greedy_dims(g)[0], self.rank), device="cpu") for g in via_sgd]
                for p, q, m in zip(ps, self._qs, self._ms, strict=True):
                    _normalize_columns_(q)
                    torch.matmul(m.reshape(-1, q.size(0)), q, out=p)
                p_group_id = group_info.group_id + AllReducePhases.PHASE_P.name.encode()
                await self._allreduce_segments([(FACTORS, ps)], group_info, p_group_id, peer_fractions, **kwargs)

                for p in ps:
                    orthogonalize_(p)
                for p, q, m in zip(ps, self._qs, self._ms, strict=True):
                    torch.matmul(m.reshape(-1, q.size(0)).t(), p, out=q)
                q_group_id = group_info.group_id + AllReducePhases.PHASE_Q.name.encode()
                await self._allreduce_segments(
                    [(FACTORS, self._qs), (WHOLE, whole)], group_info, q_group_id, peer_fractions, **kwargs
                )

                for p, q, m, grad in zip(ps, self._qs, self._ms, via_sgd, strict=True):
                    new_m = torch.matmul(p, q.t()).reshape(m.size())
                    m.sub_(new_m)  # every peer subtracts the same averaged approximation it applies
                    grad.copy_(new_m)
                return user_gathered
        except BaseException as e:
            logger.exception(e)
            raise MatchmakingException(f"Unable to run All-Reduce: {e}") from e
