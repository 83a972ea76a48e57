"""`convforever-coordinator token create|revoke|list --checkpoint-dir DIR`: the run owner's join tokens.

Tokens live in CHECKPOINT_DIR/access.sqlite beside the run key (CHECKPOINT_DIR/run_key.pem), so this runs on the
coordinator's machine, while the coordinator runs or not: a running coordinator reads the store on every request,
so a revocation takes effect at once (no renewal; peers drop the token's holders on their next revocation poll).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .access import RunKey, TokenStore, run_key_path, tokens_path


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="convforever-coordinator token",
                                description="Create, revoke or list the join tokens of a private run.")
    sub = p.add_subparsers(dest="action", required=True)
    for name, what in (("create", "print a new join token"), ("revoke", "revoke a token by its id"),
                       ("list", "list tokens (ids, names, revoked)")):
        s = sub.add_parser(name, help=what)
        s.add_argument("--checkpoint-dir", required=True, type=Path,
                       help="the coordinator's --checkpoint-dir (holds the run key and the token store)")
        if name == "create":
            s.add_argument("--name", default="", help="who the token is for (shown by `list`)")
        if name == "revoke":
            s.add_argument("token_id", help="the token's id (the part after cf1.), as `list` shows it")
    return p.parse_args(argv)


def token_main(argv: list[str]) -> None:
    args = parse(argv)
    run_key = RunKey.load_or_create(run_key_path(args.checkpoint_dir))
    store = TokenStore(tokens_path(args.checkpoint_dir), run_key.fingerprint)
    try:
        if args.action == "create":
            token = store.create(args.name)
            print(token, flush=True)
        elif args.action == "revoke":
            if not store.revoke(args.token_id):
                raise SystemExit(f"convforever-coordinator token: error: no live token {args.token_id!r} in "
                                 f"{tokens_path(args.checkpoint_dir)}; `token list` shows the ids")
            print(f"revoked {args.token_id}: its holders get no new certificate and are refused once peers see "
                  "the revocation (seconds) or their certificate expires", flush=True)
        else:
            for info in store.list():
                revoked = f"revoked {time.strftime('%Y-%m-%d %H:%M', time.gmtime(info.revoked))}" if info.revoked else "live"
                created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(info.created))
                print(f"{info.token_id}\t{created}\t{revoked}\t{info.name}", flush=True)
    finally:
        store.close()
