#!/bin/sh
# Entry point of the ConvForever image: runs whatever command it is given (any of the CLIs), with three
# additions for docker/compose.yml:
#
#   * a command that starts with "-" is a peer's arguments: `docker run IMAGE --initial-peers ...`;
#   * `convforever-coordinator ... --maddrs-file F` first removes a stale F left by an earlier container,
#     so nobody reads yesterday's file while the new coordinator starts (it writes F once its DHT is up);
#   * `convforever-peer` with CONVFOREVER_COORDINATOR_MADDRS_FILE set (and no --initial-peers of its own)
#     waits for that file and joins through it: the file gives the coordinator's peer id (the /p2p/ part,
#     stable across restarts thanks to --identity); CONVFOREVER_COORDINATOR_ADDR, e.g.
#     /dns4/coordinator/tcp/31337, says where to dial it. The addresses in the file are the ones the
#     coordinator sees (127.0.0.1 and its container's IP, or its --announce-maddrs), which another container
#     may not reach, or may reach at yesterday's IP; the compose service name always resolves. Without
#     CONVFOREVER_COORDINATOR_ADDR the file's addresses are passed as they are.
#     CONVFOREVER_WAIT (seconds, default 300) bounds the wait.
#
# `convforever-entrypoint healthcheck` is the image's HEALTHCHECK: it finds a running convforever-coordinator
# among this container's processes and asks its /healthz (at its --http-host/--http-port); a container
# running anything else (a peer, eval, demo data) has no endpoint and counts as healthy.
set -eu

log() { echo "convforever-entrypoint: $*" >&2; }

healthcheck() {
    exec python - <<'PY'
import os
import sys
import urllib.request

targets = set()
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        continue
    # a console script runs as "python /path/convforever-coordinator ..." (argv[1]), or directly (argv[0])
    if not any(os.path.basename(a) == "convforever-coordinator" for a in argv[:2]):
        continue
    host, port = "127.0.0.1", "8000"
    for flag, value in zip(argv, argv[1:]):
        if flag == "--http-port":
            port = value
        elif flag == "--http-host" and value not in ("0.0.0.0", "::", ""):
            host = value
    for arg in argv:
        if arg.startswith("--http-port="):
            port = arg.split("=", 1)[1]
        elif arg.startswith("--http-host=") and arg.split("=", 1)[1] not in ("0.0.0.0", "::", ""):
            host = arg.split("=", 1)[1]
    targets.add(f"http://{host}:{port}/healthz")
for url in sorted(targets):
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            assert response.status == 200, response.status
    except Exception as e:  # noqa: BLE001 - any failure is "unhealthy", with the reason in `docker inspect`
        sys.exit(f"{url}: {e}")
PY
}

# Prints the --initial-peers for a peer from the coordinator's multiaddrs file, waiting for the file first.
coordinator_maddrs() {
    file=$CONVFOREVER_COORDINATOR_MADDRS_FILE
    wait_s=${CONVFOREVER_WAIT:-300}
    waited=0
    until [ -s "$file" ] && grep -q '/p2p/' "$file"; do
        if [ "$waited" -ge "$wait_s" ]; then
            log "the coordinator did not write $file within ${wait_s}s: is it running, and is the volume shared?"
            return 1
        fi
        if [ "$waited" -eq 0 ]; then
            log "waiting for the coordinator's multiaddrs in $file"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    if [ -n "${CONVFOREVER_COORDINATOR_ADDR:-}" ]; then
        sed -n 's#^.*/p2p/\([^/[:space:]]*\).*$#\1#p' "$file" | sort -u | while read -r peer_id; do
            echo "${CONVFOREVER_COORDINATOR_ADDR%/}/p2p/$peer_id"
        done
    else
        grep '/p2p/' "$file"
    fi
}

case "${1:-}" in
    healthcheck)
        healthcheck
        ;;
    -*)
        set -- convforever-peer "$@"
        ;;
esac

case "${1:-}" in
    convforever-coordinator)
        previous=
        for arg in "$@"; do
            case "$previous" in --maddrs-file) rm -f -- "$arg" ;; esac
            case "$arg" in --maddrs-file=*) rm -f -- "${arg#--maddrs-file=}" ;; esac
            previous=$arg
        done
        ;;
    convforever-peer)
        if [ -n "${CONVFOREVER_COORDINATOR_MADDRS_FILE:-}" ]; then
            case " $* " in
                *" --initial-peers "* | *" --initial-peers="*) ;;  # the command names its own
                *)
                    maddrs=$(coordinator_maddrs)
                    log "joining the swarm through" $maddrs
                    # shellcheck disable=SC2086  # one argument per multiaddr; multiaddrs have no spaces
                    set -- "$@" --initial-peers $maddrs
                    ;;
            esac
        fi
        ;;
esac

exec "$@"
