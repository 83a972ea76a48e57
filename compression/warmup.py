"""PowerSGD warm-up: the first global steps average whole gradients, PowerSGD takes over after.

Early in training gradients change fast, and a rank-r approximation with error feedback lags behind them: on the
MNIST parity bench (bench/convergence.py) PowerSGD runs lost 1.5-3.4 points where the uncompressed swarm lost
none. PyTorch's own PowerSGD hook has the same remedy (``start_powerSGD_iter``: plain all-reduce first). Warm-up
rounds send the full gradient through the mode's whole-tensor codec (8-bit blockwise for the large tensors under
``powersgd-8bit``, ~4x smaller than fp32), so over a long run they cost little.

The peers of a round must agree on which kind it is, or their all-reduces would exchange differently shaped parts.
So each peer sends its epoch with its matchmaking request (hivemind's ``gather``), and every member decides from the
same gathered epochs: a warm-up round if every member reported an epoch and the lowest is below ``warmup_steps``.
A peer that reports none (``epoch_source`` unset, e.g. a bare hivemind.Optimizer in the benches) makes the round a
PowerSGD round for everyone.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Optional

from hivemind.averaging.averager import AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.partition import AllreduceException
from hivemind.optim.power_sgd_averager import AllReducePhases
from hivemind.utils.asyncio import enter_asynchronously

logger = logging.getLogger(__name__)


def is_warmup_round(gathered: list[Any], warmup_steps: int) -> bool:
    """Whether a round whose members gathered ``gathered`` (one user payload each) averages whole gradients."""
    if warmup_steps <= 0:
        return False
    epochs = [g.get("epoch") if isinstance(g, dict) else None for g in gathered]
    return all(isinstance(e, int) for e in epochs) and min(epochs) < warmup_steps


class PowerSGDWarmupMixin:
    """Put before a PowerSGD averager class (after the counting mixin, which must see every round): rounds before
    ``warmup_steps`` average the whole gradients.

    ``epoch_source`` (set in the main process by the optimizer that owns the averager) returns the epoch the next
    round belongs to; it is gathered when the round is scheduled. The error-feedback buffers (``_ms``) and the
    warm-started Q stay untouched during warm-up, so PowerSGD starts afterwards exactly as it would at step 0.
    """

    def __init__(self, *args: Any, warmup_steps: int = 0, **kwargs: Any) -> None:
        self.warmup_steps = warmup_steps
        self.epoch_source: Optional[Callable[[], int]] = None
        super().__init__(*args, **kwargs)

    def schedule_step(self, scheduled_time: Optional[float] = None, **kwargs: Any):
        if self.epoch_source is not None and kwargs.get("gather") is None:
            kwargs["gather"] = {"epoch": int(self.epoch_source())}
        return super().schedule_step(scheduled_time, **kwargs)

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any) -> Any:
        _, _, user_bytes = zip(*map(self.serializer.loads, group_info.gathered), strict=True)
        gathered = [self.serializer.loads(raw) for raw in user_bytes]
        if not is_warmup_round(gathered, self.warmup_steps):
            return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        try:
            user_gathered = dict(zip(group_info.peer_ids, gathered, strict=True))
            return await self._aggregate_whole(group_info, min_vector_size, user_gathered, **kwargs)
        except BaseException as e:
            logger.exception(e)
            raise AllreduceException(f"Unable to run the warm-up all-reduce: {e}") from e

    async def _aggregate_whole(self, group_info: GroupInfo, min_vector_size: int, user_gathered: dict,
                               **kwargs: Any) -> dict:
        """hivemind's plain averaging (DecentralizedAverager._aggregate_with_group) under the P phase's group id,
        the one PowerSGD registered for this group (``_register_allreduce_group``)."""
        bandwidths, mode_ids, _ = zip(*map(self.serializer.loads, group_info.gathered), strict=True)
        download_bandwidths = [bw if AveragingMode(mode) != AveragingMode.CLIENT else 0.0
                               for bw, mode in zip(bandwidths, mode_ids, strict=True)]
        peer_fractions = await asyncio.get_event_loop().run_in_executor(
            None, load_balance_peers, self.total_size, download_bandwidths, min_vector_size)
        group_id = group_info.group_id + AllReducePhases.PHASE_P.name.encode()
        async with enter_asynchronously(self.get_tensors()) as averaged_grads:
            await self._run_allreduce_inplace_(averaged_grads, group_info, group_id, peer_fractions=peer_fractions,
                                               **kwargs)
        # no Q phase this round: settle its registration (a groupmate that sent Q parts anyway gets an error)
        unused = self._running_groups.get(group_info.group_id + AllReducePhases.PHASE_Q.name.encode())
        if unused is not None and not unused.done():
            unused.cancel()
        return user_gathered
