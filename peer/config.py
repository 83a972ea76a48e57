"""The peer's configuration: one dataclass, built from the command line in one place (`cli.py`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from convforever.compression import CompressionConfig
from convforever.data import CATEGORIES
from convforever.data.augment import AugmentConfig
from convforever.model import ModelConfig

from .accel import OPTIMIZERS, PRECISIONS
from .recipe import RecipeConfig


@dataclass
class PeerConfig:
    run_id: str
    data: Optional[str] = None  # local files to train on; None: shards leased from the coordinator
    initial_peers: list[str] = field(default_factory=list)  # empty: start a new swarm alone
    model: ModelConfig = field(default_factory=ModelConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    image_size: int = 64
    batch_size: int = 16  # samples per local forward/backward
    target_batch_size: int = 256  # samples the whole swarm accumulates per global step
    device: str = "auto"
    max_steps: Optional[int] = None  # leave after this many global steps
    min_peers: int = 1  # training peers (us included) to wait for before the first step
    # How the swarm optimises (lr schedule, clipping, EMA, curricula): peer/recipe.py; every peer must agree.
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    # hivemind timing. Matchmaking must be long enough for every peer's "I am ready" to reach the
    # others over the DHT, or peers average alone, fall out of step and re-download the state.
    matchmaking_time: float = 5.0
    averaging_timeout: float = 30.0
    # Parameters are re-synchronised by a full (fp16) state all-reduce every this many global steps;
    # hivemind's default of 1 would send the whole model every step. For ConvNeXt-T one fp16 state
    # round is 57 MB per peer against 0.57 MB per PowerSGD-8bit gradient round (bench/RESULTS.md),
    # so every 100 steps about doubles the traffic, and resets the small drift quantised averaging leaves.
    average_state_every: int = 100
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: list[str] = field(default_factory=list)
    client_mode: bool = False  # behind NAT with no port forwarding: dial out only
    num_workers: int = 1  # DataLoader decode/augment processes
    threads: Optional[int] = None  # torch CPU threads; None = torch's default (all cores)
    seed: Optional[int] = None  # data order; None = random per peer
    report_every: float = 5.0  # seconds between progress lines
    save_on_exit: Optional[Path] = None  # also write this peer's final weights here when it leaves
    coordinator_url: Optional[str] = None  # the coordinator's HTTP API; None: the URL it announces in the DHT
    data_root: Optional[str] = None  # read leased shards from this copy of the dataset instead of the plan's root
    labels: Optional[str] = None  # labels dataset (id -> label) overriding the caption classifier
    init_from: Optional[str] = None  # start from this checkpoint (DIR[@step-N] or ORG/REPO[@REVISION])
    # The ConvNeXt recipe's augmentation and targets (data/augment.py); AugmentConfig.off() for short CPU runs.
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # The local step on the accelerator (peer/accel.py): none of these changes what the swarm computes.
    precision: str = "auto"  # auto: bf16 where supported, else fp16 with hivemind's GradScaler; fp32 on the CPU
    channels_last: Optional[bool] = None  # None: on for CUDA
    compile: bool = False
    checkpointing: bool = False  # recompute each block's activations in backward
    optimizer: str = "adamw"  # or adamw8bit (bitsandbytes)
    offload_optimizer: bool = False  # hivemind keeps the optimizer (and its statistics) on the CPU
    # train: compute gradients on data; replica: follow every averaged step with weight 0 and serve the state
    role: str = "train"
    exit_grace: float = 60.0  # seconds to wait, at --max-steps, for the coordinator to checkpoint our final step
    # A private run's join token (--token or CONVFOREVER_TOKEN), exchanged at coordinator_url for a certificate
    # (peer/access.py); None: a public run.
    token: Optional[str] = None

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.target_batch_size >= self.batch_size, "--target-batch-size must be >= --batch-size"),
            # The stem (4x) and three 2x downsamplings need at least 32 pixels to leave one pixel at the end.
            (self.image_size >= 32, "--image-size must be >= 32 pixels (ConvNeXt downsamples 32x)"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.min_peers >= 1, "--min-peers must be >= 1"),
            (self.threads is None or self.threads >= 1, "--threads must be >= 1"),
            (self.model.num_classes >= len(CATEGORIES), f"--num-classes must be >= {len(CATEGORIES)}, the caption categories"),
            (not (self.offload_optimizer and self.recipe.ema and self.recipe.ema_device != "cpu"),
             "--ema-device must be cpu with --offload-optimizer"),
            (self.average_state_every >= 1, "--average-state-every must be >= 1"),
            (self.precision in PRECISIONS, f"--precision is one of {', '.join(PRECISIONS)}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer is one of {', '.join(OPTIMIZERS)}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "--device is auto, cpu or cuda[:N]"),
            (self.role in ("train", "replica"), "--role is train or replica"),
            (bool(self.run_id) and "." not in self.run_id, "--run-id must be a non-empty name without dots"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict:
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        if out.get("token"):
            out["token"] = "<hidden>"  # the dict is logged; a join token is a secret
        return out


def recipe_settings(config: PeerConfig) -> dict:
    """The settings that shape the swarm's optimizer state and its averaging rounds: every peer must agree on them.

    Local choices (threads, device, precision, data, batch size per step, reporting) are left out: peers that
    differ only in those still compute the same steps.
    """
    recipe = asdict(config.recipe)
    recipe.pop("ema_device")  # where the EMA lives, not what it holds
    return {
        "model": asdict(config.model), "recipe": recipe, "compression": asdict(config.compression),
        "target_batch_size": config.target_batch_size, "average_state_every": config.average_state_every,
        "optimizer": config.optimizer,
    }


def recipe_hash(config: PeerConfig) -> str:
    """A short hash of `recipe_settings`, published in ModelInfo so a replica can check it follows the same recipe."""
    blob = json.dumps(recipe_settings(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
