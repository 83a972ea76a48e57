"""`convforever-coordinator`: start the swarm's bootstrap node, status line and checkpoints."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from pathlib import Path

from hivemind.p2p import P2PDaemonError

from .hub import default_repo
from .process import enable_crash_traces, install_stop_handlers, no_main_thread_event_loop, setup_logging
from .service import Coordinator, CoordinatorConfig

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> CoordinatorConfig:
    p = argparse.ArgumentParser(
        prog="convforever-coordinator",
        description="Bootstrap DHT node of a ConvForever swarm: tracks the global step and writes checkpoints.",
    )
    p.add_argument("--run-id", required=True, help="name of the training run; peers pass the same --run-id")
    p.add_argument("--checkpoint-dir", required=True, type=Path, help="where step-N/ checkpoints and 'latest' go")
    p.add_argument("--checkpoint-every", type=int, default=10, help="global steps between checkpoints (default 10)")
    p.add_argument("--maddrs-file", type=Path, help="also write the multiaddrs peers should dial here, one per line")
    p.add_argument(
        "--host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/31337"],
        help="multiaddrs to listen on (default /ip4/0.0.0.0/tcp/31337; /tcp/0 picks a free port)",
    )
    p.add_argument("--announce-maddrs", nargs="+", default=[], help="public multiaddrs to announce (behind NAT)")
    p.add_argument("--identity", type=Path, help="private key file; created if missing, keeps the peer id across restarts")
    p.add_argument("--status-every", type=float, default=5.0, help="seconds between status lines")
    p.add_argument("--state-timeout", type=float, default=120.0, help="seconds allowed for one state download")
    p.add_argument("--dataset", help="data to hand out as shard leases: a Hub dataset (Spawning/pd-extended), a local "
                   "directory, file or glob of .parquet/.jsonl files, or an ImageFolder; stored in CHECKPOINT_DIR/leases.sqlite, "
                   "so a restart resumes without it")
    p.add_argument("--subset", help="only the files under this folder of --dataset (pd12m or megalith-cc0 for pd-extended)")
    p.add_argument("--shard-rows", type=int, default=20_000, help="rows per shard (default 20000: minutes of a consumer GPU)")
    p.add_argument("--lease-ttl", type=float, default=300.0, help="seconds a lease lives without a renewal (default 300)")
    p.add_argument("--http-host", default="0.0.0.0", help="address of the HTTP API (default 0.0.0.0)")
    p.add_argument("--http-port", type=int, default=8000, help="port of the HTTP API (default 8000; 0 picks a free one)")
    p.add_argument("--public-url", help="URL peers reach the HTTP API at, if not this machine's addresses (proxy, NAT)")
    p.add_argument("--hub-repo", metavar="ORG/NAME",
                   help="also publish every checkpoint to this Hugging Face Hub model repository (token: HF_TOKEN "
                        "or `hf auth login`); one commit and one step-N tag per checkpoint")
    p.add_argument("--org", help="publish to ORG/ConvForever-RUN_ID (instead of --hub-repo)")
    p.add_argument("--hub-private", action="store_true", help="create the Hub repository private")
    p.add_argument("--access", choices=("public", "private"), default="public",
                   help="private: only peers with a join token (`convforever-coordinator token create`) take part; "
                        "every RPC and lease call checks their certificate (default public)")
    p.add_argument("--private", dest="access", action="store_const", const="private", help="same as --access private")
    p.add_argument("--public-status", action="store_true",
                   help="in a private run, keep the page, /api/status and /metrics open to anyone")
    p.add_argument("--cert-ttl", type=float, default=600.0,
                   help="seconds an access certificate lives (default 600; peers renew at half-life)")
    p.add_argument("-v", "--verbose", action="store_true", help="log hivemind's own messages too")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return CoordinatorConfig(
            run_id=args.run_id, checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
            host_maddrs=args.host_maddrs, announce_maddrs=args.announce_maddrs, maddrs_file=args.maddrs_file,
            identity=args.identity, status_every=args.status_every, state_timeout=args.state_timeout,
            dataset=args.dataset, subset=args.subset, shard_rows=args.shard_rows, lease_ttl=args.lease_ttl,
            http_host=args.http_host, http_port=args.http_port, public_url=args.public_url,
            hub_repo=args.hub_repo or (default_repo(args.org, args.run_id) if args.org else None),
            hub_private=args.hub_private, access=args.access, public_status=args.public_status,
            cert_ttl=args.cert_ttl,
        )
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["token"]:  # the run owner's join tokens: access_cli.py
        from .access_cli import token_main

        return token_main(argv[1:])
    config = parse_args(argv)
    if config.hub_repo:
        from huggingface_hub import get_token

        if not get_token():
            raise SystemExit(f"convforever-coordinator: error: --hub-repo {config.hub_repo} needs a Hugging Face token "
                             "with write access: set HF_TOKEN or run `hf auth login` (or drop --hub-repo/--org to keep "
                             "checkpoints local only)")
    stop = threading.Event()
    install_stop_handlers(stop)
    no_main_thread_event_loop()
    enable_crash_traces()
    logger.info(f"config: {json.dumps(vars(config), default=str)}")
    try:
        coordinator = Coordinator(config)
    except P2PDaemonError as e:
        raise SystemExit(f"convforever-coordinator: error: could not start the DHT node on --host-maddrs "
                         f"{' '.join(config.host_maddrs)}: {e}. Is the port already in use?") from None
    except (OSError, ValueError) as e:  # the HTTP port, or a --dataset that cannot be planned
        raise SystemExit(f"convforever-coordinator: error: {e}") from None
    try:
        print("[coordinator] peers join with: --initial-peers " + " ".join(coordinator.maddrs), flush=True)
        print("[coordinator] HTTP API at " + " ".join(coordinator.api_urls), flush=True)
        if coordinator.private is not None:
            print(f"[coordinator] private run (key {coordinator.private.issuer.run_key.fingerprint}): peers add "
                  f"--token TOKEN --coordinator {coordinator.api_urls[0]}; create tokens with: convforever-coordinator "
                  f"token create --checkpoint-dir {config.checkpoint_dir}", flush=True)
        coordinator.run(stop)
    finally:
        coordinator.shutdown()


if __name__ == "__main__":
    main()
