"""Download the swarm's current model state from a training peer, and refuse stale answers.

Peers serve their state through `GuardedTrainingStateAverager` (hivemind's `TrainingStateAverager` with the
poisoning guard; prefix ``{run_id}_state_averager``); its answer is (metadata, flat tensors) where the tensors are
the optimizer's parameters in param-group order, then the optimizer statistics. We map them back to names with
`convforever.model.flat_parameter_names`, the same ordering the peers build their param groups with.

hivemind's own `Optimizer.load_state_from_peers` returns None whether it loaded a state or
refused a stale one; here we look at the epoch in the metadata ourselves, so a checkpoint is only
written from a state that is really at (or after) the step we are saving.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from hivemind import DHT
from hivemind.averaging import DecentralizedAverager

from convforever.compression.guard import GuardedTrainingStateAverager
from convforever.model import ConvNeXt, flat_parameter_names

from .process import keep_signal_handlers

logger = logging.getLogger(__name__)


@dataclass
class FetchedState:
    step: int
    state_dict: dict[str, torch.Tensor]
    ema_state_dict: Optional[dict[str, torch.Tensor]] = None  # the swarm's EMA, when peers share one


class StateDownloader(DecentralizedAverager):
    """A DecentralizedAverager that calls the peers' state averager's download handler.

    hivemind names RPC handlers after the serving class
    (``{prefix}::GuardedTrainingStateAverager.rpc_download_state``), so a plain DecentralizedAverager would ask for a
    protocol the peers do not speak. We need none of the state averager's optimizer machinery to download, only its
    handler names.
    """

    @classmethod
    def get_stub(cls, p2p, peer, *, namespace=None):
        return GuardedTrainingStateAverager.get_stub(p2p, peer, namespace=namespace)


class StateFetcher:
    """A client-mode averager that never averages: it only downloads peers' state on demand."""

    def __init__(self, dht: DHT, run_id: str, model: ConvNeXt, timeout: float = 60.0, access=None):
        self.names = flat_parameter_names(model)
        params = dict(model.named_parameters())
        self.shapes = [params[name].shape for name in self.names]
        self.timeout = timeout
        with keep_signal_handlers():
            self.averager = StateDownloader(
                averaged_tensors=[torch.zeros(1)],  # never averaged; hivemind only requires something here
                dht=dht,
                prefix=f"{run_id}_state_averager",
                client_mode=True,  # do not announce ourselves as a state source or an averaging partner
                start=access is None,
            )
            if access is not None:  # a private run: download only from certified donors (peer/access.py)
                from convforever.peer.access import start_authorized

                start_authorized(self.averager, access)

    def fetch(self, min_step: int, with_ema: bool = False) -> Optional[FetchedState]:
        """Return the state if a peer served one at step >= `min_step`, else None (and say why)."""
        try:
            loaded = self.averager.load_state_from_peers(timeout=self.timeout)
        except TimeoutError:
            logger.warning(f"downloading the state took longer than {self.timeout:.0f}s; will retry "
                           "(raise --state-timeout on slow links)")
            return None
        if loaded is None:
            logger.warning("no peer served its state (none online, or all downloads failed); will retry")
            return None
        metadata, tensors = loaded
        step = metadata.get("epoch") if isinstance(metadata, dict) else None
        if not isinstance(step, int) or step < min_step:
            logger.warning(f"refusing stale state: a peer served step {step}, we need at least {min_step}; will retry")
            return None
        # Peers serve their parameters, then (with --ema) the EMA of the same parameters, then optimizer state.
        needed = len(self.names) * (2 if with_ema else 1)
        if len(tensors) < needed:
            logger.warning(f"a peer served {len(tensors)} tensors, we need {needed} for {len(self.names)} parameters"
                           + (" and their EMA" if with_ema else ""))
            return None
        state_dict = self._named(tensors[: len(self.names)], "")
        ema = self._named(tensors[len(self.names): needed], "EMA ") if with_ema else None
        if state_dict is None or (with_ema and ema is None):
            return None
        return FetchedState(step=step, state_dict=state_dict, ema_state_dict=ema)

    def _named(self, tensors, what: str) -> Optional[dict[str, torch.Tensor]]:
        state_dict = {}
        for name, shape, tensor in zip(self.names, self.shapes, tensors):
            if tensor.shape != shape:
                logger.warning(f"a peer served {what}{name} with shape {tuple(tensor.shape)}, expected {tuple(shape)}")
                return None
            if not torch.isfinite(tensor).all():
                logger.warning(f"a peer served non-finite values in {what}{name}; not checkpointing this state")
                return None
            state_dict[name] = tensor.float()
        return state_dict

    def shutdown(self) -> None:
        self.averager.shutdown()
