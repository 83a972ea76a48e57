"""`convforever-peer`: join a swarm (or start one) and train until told to stop."""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
from pathlib import Path

from convforever.compression import LAYOUTS, MODES, WHOLE_CODECS, CompressionConfig
from convforever.coordinator.process import (
    enable_crash_traces,
    install_stop_handlers,
    no_main_thread_event_loop,
    setup_logging,
)
from convforever.data.augment import AugmentConfig
from convforever.model import MODEL_NAMES, ModelConfig

from .accel import OPTIMIZERS, PRECISIONS
from .config import PeerConfig
from .recipe import add_recipe_arguments, recipe_from_args

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    d = PeerConfig(run_id="x")  # defaults, shown in --help
    p = argparse.ArgumentParser(
        prog="convforever-peer",
        description="Train ConvNeXt together with a ConvForever swarm (hivemind + PowerSGD + 8-bit gradients).",
    )
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR",
                   help="multiaddrs printed by the coordinator (or any peer); none starts a new swarm")
    p.add_argument("--run-id", required=True, help="the run's name, the same on every peer and the coordinator")
    p.add_argument("--role", choices=("train", "replica"), default=d.role,
                   help="train: compute gradients (default); replica: follow every averaged step without data and "
                        "serve the swarm's state to joining peers (needs the training peers' exact recipe flags)")
    p.add_argument("--data", help="train on these local files instead of the coordinator's shards: .parquet/.jsonl "
                   "file, directory or glob, or an ImageFolder (default: lease shards from the coordinator)")
    p.add_argument("--coordinator", metavar="URL",
                   help="the coordinator's HTTP API (default: the URL it announces in the swarm)")
    p.add_argument("--data-root", help="read leased shards from this local copy of the coordinator's dataset")
    p.add_argument("--token", help="join token of a private run, from its owner (default: $CONVFOREVER_TOKEN); "
                   "needs --coordinator URL, where it is exchanged for this peer's access certificate")
    p.add_argument("--init-from", metavar="REPO_OR_DIR[@REV]",
                   help="start from this checkpoint (a folder, DIR@step-N, or a Hub repo ORG/REPO[@step-N]) instead "
                        "of the run's seeded initialisation; a swarm that is already ahead still wins")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="autocast precision: auto = bf16 where the GPU supports it, else fp16 with loss scaling; fp32 on CPU")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps)")
    p.add_argument("--checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass: deep models in little memory")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help="adamw8bit keeps AdamW's statistics in 8 bits (bitsandbytes)")
    p.add_argument("--offload-optimizer", action="store_true",
                   help="keep the optimizer and its statistics on the CPU (hivemind's offload): saves GPU memory")
    aug = AugmentConfig()
    p.add_argument("--aa", default=aug.randaugment, metavar="SPEC",
                   help="RandAugment in timm's notation, e.g. rand-m9-mstd0.5 (default); 'none' turns it off")
    p.add_argument("--reprob", type=float, default=aug.random_erasing, help="random erasing probability (0: off)")
    p.add_argument("--mixup", type=float, default=aug.mixup, help="Mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=aug.cutmix, help="CutMix alpha (0: off)")
    p.add_argument("--mixup-prob", type=float, default=aug.mix_prob, help="chance a batch is mixed at all")
    p.add_argument("--mixup-switch-prob", type=float, default=aug.mix_switch_prob,
                   help="chance of CutMix instead of Mixup when both are on")
    p.add_argument("--smoothing", type=float, default=aug.label_smoothing, help="label smoothing")
    p.add_argument("--no-augment", action="store_true",
                   help="turn all of the above off (crop + flip, hard labels): for short runs and small images")
    p.add_argument("--labels", metavar="PATH_OR_REPO",
                   help="labels dataset (id, label) from convforever-label; overrides the caption classifier")
    p.add_argument("--model", default=ModelConfig().name, help="one of: " + ", ".join(MODEL_NAMES) + " (or atto..base)")
    p.add_argument("--depth", type=int, help="total blocks, spread over the 4 stages (>= 4); default: the preset's")
    p.add_argument("--drop-path", type=float, default=ModelConfig().drop_path_rate,
                   help="stochastic depth: the drop rate grows linearly to this at the last block (ConvNeXt-T: 0.1)")
    p.add_argument("--num-classes", type=int, default=ModelConfig().num_classes)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per local forward/backward")
    p.add_argument("--target-batch-size", type=int, default=d.target_batch_size,
                   help="samples the whole swarm accumulates per global step")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N]")
    p.add_argument("--compression", choices=MODES, default=CompressionConfig().mode)
    p.add_argument("--rank", type=int, default=CompressionConfig().rank, help="PowerSGD rank")
    p.add_argument("--powersgd-layout", choices=LAYOUTS, default=CompressionConfig().layout,
                   help="flat: one 8-bit codebook per buffer instead of per tensor (fewer bytes, more drift)")
    p.add_argument("--powersgd-warmup", type=int, default=CompressionConfig().warmup_steps, metavar="STEPS",
                   help="average whole gradients (8-bit) for the first STEPS global steps, then PowerSGD")
    p.add_argument("--whole-codec", choices=WHOLE_CODECS, default=CompressionConfig().whole_codec,
                   help="codec for the tensors PowerSGD leaves whole, under --powersgd-layout flat")
    p.add_argument("--max-steps", type=int, help="leave after this many global steps")
    p.add_argument("--min-peers", type=int, default=d.min_peers,
                   help="wait until this many training peers (this one included) are online before training")
    p.add_argument("--lr", type=float, default=d.recipe.lr, help="peak learning rate (after warm-up)")
    p.add_argument("--weight-decay", type=float, default=d.recipe.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.recipe.warmup_steps, help="global steps of linear warm-up")
    add_recipe_arguments(p)
    p.add_argument("--matchmaking-time", type=float, default=d.matchmaking_time,
                   help="seconds to gather peers for an all-reduce; raise it on slow links")
    p.add_argument("--averaging-timeout", type=float, default=d.averaging_timeout)
    p.add_argument("--average-state-every", type=int, default=d.average_state_every,
                   help="global steps between full parameter re-synchronisations")
    p.add_argument("--host-maddrs", nargs="+", default=d.host_maddrs)
    p.add_argument("--announce-maddrs", nargs="+", default=[])
    p.add_argument("--client-mode", action="store_true", help="dial out only (behind NAT without port forwarding)")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="data decoding processes")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: all cores); give each of several peers on one machine its share")
    p.add_argument("--seed", type=int, help="data order seed (default: random per peer)")
    p.add_argument("--report-every", type=float, default=d.report_every, help="seconds between progress lines")
    p.add_argument("--save-on-exit", type=Path, help="write this peer's weights here (safetensors) when it leaves")
    p.add_argument("--exit-grace", type=float, default=d.exit_grace,
                   help="seconds to wait at --max-steps for the coordinator to checkpoint the final step")
    p.add_argument("-v", "--verbose", action="store_true", help="log hivemind's own messages too")
    return p


def parse_args(argv: list[str] | None = None) -> PeerConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        augment = AugmentConfig.off() if args.no_augment else AugmentConfig(
            randaugment=None if args.aa.lower() == "none" else args.aa, random_erasing=args.reprob, mixup=args.mixup,
            cutmix=args.cutmix, mix_prob=args.mixup_prob, mix_switch_prob=args.mixup_switch_prob,
            label_smoothing=args.smoothing)
        return PeerConfig(
            run_id=args.run_id, data=args.data, initial_peers=args.initial_peers,
            model=ModelConfig(name=args.model, depth=args.depth, num_classes=args.num_classes,
                              drop_path_rate=args.drop_path),
            compression=CompressionConfig(mode=args.compression, rank=args.rank, layout=args.powersgd_layout,
                                          warmup_steps=args.powersgd_warmup,
                                          whole_codec=args.whole_codec),
            image_size=args.image_size, batch_size=args.batch_size, target_batch_size=args.target_batch_size,
            device=args.device, max_steps=args.max_steps, min_peers=args.min_peers, recipe=recipe_from_args(args),
            matchmaking_time=args.matchmaking_time,
            averaging_timeout=args.averaging_timeout, average_state_every=args.average_state_every,
            host_maddrs=args.host_maddrs, announce_maddrs=args.announce_maddrs, client_mode=args.client_mode,
            num_workers=args.num_workers, threads=args.threads, seed=args.seed, report_every=args.report_every,
            save_on_exit=args.save_on_exit, exit_grace=args.exit_grace, coordinator_url=args.coordinator,
            token=args.token or os.environ.get("CONVFOREVER_TOKEN") or None,  # peer/access.py TOKEN_ENV
            data_root=args.data_root, labels=args.labels, init_from=args.init_from, precision=args.precision,
            channels_last=args.channels_last, compile=args.compile, checkpointing=args.checkpointing,
            optimizer=args.optimizer, offload_optimizer=args.offload_optimizer, augment=augment, role=args.role,
        )
    except ValueError as e:
        parser.error(str(e))


def check_data(config: PeerConfig) -> None:
    """Fail on a wrong --data before joining the swarm, not after."""
    from convforever.data.shards import local_plan

    if config.data is None or config.role == "replica":  # a replica reads no data
        return
    try:
        plan = local_plan(config.data)
    except ValueError as e:
        raise SystemExit(f"convforever-peer: error: --data: {e}") from None
    logger.info(f"training data: {len(plan.shards)} shard(s), {plan.num_rows} rows from {config.data}")


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    check_data(config)
    stop = threading.Event()
    install_stop_handlers(stop)
    no_main_thread_event_loop()
    enable_crash_traces()
    logger.info(f"config: {json.dumps(config.to_dict())}")
    from .trainer import Peer, SwarmUnreachable  # heavy imports after argument errors have had their say

    if config.role == "replica":
        from .replica import run_replica

        try:
            run_replica(config, stop)
        except (SwarmUnreachable, ValueError) as e:  # includes a recipe that differs from the swarm's
            raise SystemExit(f"convforever-peer: error: {e}") from None
        return
    try:
        peer = Peer(config)
    except (SwarmUnreachable, ValueError) as e:  # unreachable swarm, unusable data or device: say what to fix
        raise SystemExit(f"convforever-peer: error: {e}") from None
    try:
        logger.info("other peers can also join through: " + " ".join(peer.visible_maddrs))
        peer.run(stop)
    finally:
        peer.close()


if __name__ == "__main__":
    main()
