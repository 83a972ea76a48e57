"""Emulated home links: every node in its own network namespace, joined through a bridge, with ``tc tbf`` limits.

Why namespaces: on 127.0.0.1 every peer has infinite bandwidth and no queue, so nothing about a 20 Mbit/s home
uplink shows. Here each node (a peer, the coordinator's DHT bootstrap node) gets a namespace ``<prefix><name>``
with one interface, ``eth0`` (10.77.0.N/24). Its other end, ``v-<name>``, is a port of the bridge ``br0`` in the
hub namespace ``<prefix>hub`` (the "internet"; nothing touches the root namespace, so the host's routes and
interfaces are never changed). Shaping, per node:

* upload: ``tbf`` on the node's ``eth0`` egress (``LinkSpec.up_mbit``);
* download: ``tbf`` on the hub's ``v-<name>`` egress toward the node (``LinkSpec.down_mbit``).

``tbf`` parameters: ``burst`` is the token bucket (bytes sent at line rate after an idle spell; a home modem's is
small, so 32 KiB), ``latency`` the longest a packet may wait in the queue before tbf drops it (the modem's buffer;
50 ms here, i.e. 125 KB at 20 Mbit/s, which TCP sees as loss when it overfills).

Latency: this kernel has no ``netem``, so ``LinkSpec.delay_ms`` is added by a user-space TCP relay
(``python bench/netns.py relay``) in the node's namespace: it listens on ``RELAY_PORT`` and forwards to the node's
own ``SERVICE_PORT``, holding every chunk ``delay_ms`` in each direction, pipelined so throughput is not capped.
Nodes announce the relay's address, so every connection *to* a node crosses exactly one relay: RTT grows by
``2 * delay_ms``. Connections a node dials out go to the other side's relay, so each connection is delayed once.

Cleanup: ``Lab`` is a context manager whose exit kills every process inside its namespaces and deletes them, on
errors too. While it is open, SIGTERM and SIGHUP become ``SystemExit`` so that ``finally`` runs (SIGINT already
raises). Children (peers, relays) exit when their stdin closes, so they go with a parent that dies. A SIGKILLed
parent cannot delete its namespaces: the next ``Lab`` with the same prefix deletes them on entry, and
``python bench/netns.py cleanup`` deletes every ``cfh-*`` namespace (a running lab's too) by hand. Namespaces are
only created and deleted under ``prefix`` (``cfh-`` plus one suffix per user: the tests' and the bench's differ),
so two labs with different prefixes can run side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterator, Optional, Sequence

SUBNET = "10.77.0"
SERVICE_PORT = 31337  # the node's own listening port (hivemind's p2p daemon binds it)
RELAY_PORT = 41337  # the latency relay's port, announced instead of SERVICE_PORT when delay_ms > 0
HUB = "hub"
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # turned into SystemExit while a Lab is open (SIGINT already raises)


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no ``ip``, a sandbox without CAP_SYS_ADMIN): skip, do not fail."""


@dataclass(frozen=True)
class LinkSpec:
    """One node's access link. ``None`` rates mean unshaped (the veth's own speed, several Gbit/s).

    :param up_mbit: node -> internet rate (a home uplink: 20 Mbit/s).
    :param down_mbit: internet -> node rate (100 Mbit/s).
    :param burst_bytes: tbf bucket; bigger lets bursts through at line rate.
    :param queue_ms: tbf ``latency``, the queue the modem holds before dropping.
    :param delay_ms: one-way delay added by the relay on connections *to* this node (0: no relay).
    """

    up_mbit: Optional[float] = 20.0
    down_mbit: Optional[float] = 100.0
    burst_bytes: int = 32 * 1024
    queue_ms: int = 50
    delay_ms: float = 0.0

    def describe(self) -> str:
        def rate(mbit: Optional[float]) -> str:
            return "unshaped" if mbit is None else f"{mbit:g}"

        rates = "unshaped" if self.up_mbit is None and self.down_mbit is None else (
            f"{rate(self.up_mbit)} up / {rate(self.down_mbit)} down Mbit/s, tbf burst {self.burst_bytes} B, "
            f"queue {self.queue_ms} ms")
        return rates + (f", +{self.delay_ms:g} ms one-way (relay)" if self.delay_ms else "")


@dataclass(frozen=True)
class Node:
    """A node of a ``Lab``: its namespace, address, and the address peers should dial (the relay's when delayed)."""

    name: str
    netns: str
    ip: str
    link: LinkSpec

    @property
    def listen_maddr(self) -> str:
        return f"/ip4/{self.ip}/tcp/{SERVICE_PORT}"

    @property
    def announce_maddr(self) -> str:
        return f"/ip4/{self.ip}/tcp/{RELAY_PORT if self.link.delay_ms else SERVICE_PORT}"


@dataclass(frozen=True)
class IfaceCounters:
    """Bytes and packets through a node's ``eth0`` (from the kernel, so TCP/IP headers and all traffic included)."""

    tx_bytes: int
    rx_bytes: int
    tx_packets: int
    rx_packets: int

    def __sub__(self, earlier: IfaceCounters) -> IfaceCounters:
        return IfaceCounters(self.tx_bytes - earlier.tx_bytes, self.rx_bytes - earlier.rx_bytes,
                             self.tx_packets - earlier.tx_packets, self.rx_packets - earlier.rx_packets)


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def list_netns(prefix: str) -> list[str]:
    """Namespaces whose name starts with ``prefix``."""
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].startswith(prefix)]


SHM_MANAGER = "torch_shm_manager"


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def kill_netns_processes(netns: str, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, every process inside ``netns`` (all of them were started by the lab that owns it).

    torch's shared-memory manager is spared until the others are gone: it unlinks the /dev/shm files of the tensors
    hivemind shares once its last client disconnects, and killing it first leaks them (hundreds of MB per peer).
    """
    def pids() -> list[int]:
        return [int(p) for p in _run("ip", "netns", "pids", netns, check=False).stdout.split()]

    def signal_all(sig: int, spare_manager: bool) -> list[int]:
        targets = [p for p in pids() if not (spare_manager and _process_name(p) == SHM_MANAGER)]
        for pid in targets:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return targets

    def wait_until(done: Callable[[], bool], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not done() and time.monotonic() < deadline:
            time.sleep(0.1)

    def clients_gone() -> bool:
        return all(_process_name(p) == SHM_MANAGER for p in pids())

    if signal_all(signal.SIGTERM, spare_manager=True):
        wait_until(clients_gone, grace)
    if signal_all(signal.SIGKILL, spare_manager=True):
        wait_until(clients_gone, 2.0)
    wait_until(lambda: not pids(), grace)  # the manager cleans up and leaves on its own
    if signal_all(signal.SIGKILL, spare_manager=False):
        wait_until(lambda: not pids(), 2.0)


def delete_netns(prefix: str) -> list[str]:
    """Kill the processes in, and delete, every namespace named ``prefix*``; returns the names deleted.

    Deleting a namespace destroys its veth ends, which takes the peer ends (and their qdiscs) with them.
    """
    names = list_netns(prefix)
    for name in names:
        kill_netns_processes(name)
    for name in names:
        _run("ip", "netns", "del", name, check=False)
    return names


def check_netns_support(prefix: str = "cfh-probe-") -> None:
    """Raise NetnsUnavailable with the reason when this machine cannot run a Lab."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        raise NetnsUnavailable("iproute2 (`ip`, `tc`) is not installed")
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)")
    name = f"{prefix}{os.getpid()}"
    made = _run("ip", "netns", "add", name, check=False)
    try:
        if made.returncode != 0:
            raise NetnsUnavailable(f"`ip netns add` failed: {made.stderr.strip()}")
        veth = _run("ip", "-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1", check=False)
        if veth.returncode != 0:
            raise NetnsUnavailable(f"cannot create a veth pair: {veth.stderr.strip()}")
        tbf = _run("tc", "-n", name, "qdisc", "add", "dev", "p0", "root", "tbf", "rate", "10mbit", "burst", "32kb",
                   "latency", "50ms", check=False)
        if tbf.returncode != 0:
            raise NetnsUnavailable(f"`tc tbf` is not available: {tbf.stderr.strip()}")
    finally:
        _run("ip", "netns", "del", name, check=False)


def read_counters(netns: str, iface: str = "eth0") -> IfaceCounters:
    """The kernel's counters for ``iface`` inside ``netns`` (``ip -s -j link``, no process entered)."""
    out = _run("ip", "-n", netns, "-s", "-j", "link", "show", "dev", iface).stdout
    stats = json.loads(out)[0]["stats64"]
    return IfaceCounters(stats["tx"]["bytes"], stats["rx"]["bytes"], stats["tx"]["packets"], stats["rx"]["packets"])


@dataclass
class Child:
    """A process running inside a namespace that speaks JSON lines on stdout and reads commands from stdin."""

    name: str
    process: subprocess.Popen
    events: "queue.Queue[dict]" = field(default_factory=queue.Queue)
    log: list[str] = field(default_factory=list)  # its non-JSON output (stderr too), also echoed to our stderr

    def send(self, command: dict) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def next_event(self, timeout: float) -> dict:
        """The next JSON line; raises if the child exits or says nothing for ``timeout`` seconds."""
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no event in {timeout:.0f}s") from None
        if event.get("event") == "exit":
            raise RuntimeError(f"{self.name} exited with code {event['code']} (its traceback is in stderr above)")
        if event.get("event") == "error":
            raise RuntimeError(f"{self.name} failed: {event.get('message')}")
        return event

    def expect(self, kind: str, timeout: float) -> dict:
        event = self.next_event(timeout)
        if event.get("event") != kind:
            raise RuntimeError(f"{self.name}: expected a {kind!r} event, got {event}")
        return event


def _pump(child: Child, stream: IO[str]) -> None:
    for line in stream:
        line = line.strip()
        if line.startswith("{"):
            try:
                child.events.put(json.loads(line))
                continue
            except json.JSONDecodeError:
                pass
        if line:
            child.log.append(line)
            print(f"[{child.name}] {line}", file=sys.stderr, flush=True)
    child.events.put({"event": "exit", "code": child.process.wait()})


class Lab:
    """A set of namespaced nodes behind emulated access links; use as ``with Lab(prefix) as lab:``.

    :param prefix: every namespace is ``prefix + name``; leftovers with this prefix are deleted on entry.
    """

    def __init__(self, prefix: str = "cfh-") -> None:
        if not prefix.startswith("cfh-"):
            raise ValueError("lab namespaces must start with 'cfh-', so cleanup by prefix never touches others'")
        self.prefix = prefix
        self.hub = prefix + HUB
        self.nodes: dict[str, Node] = {}
        self.children: list[Child] = []
        self._previous_handlers: dict[int, Any] = {}

    # -- lifecycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        check_netns_support()
        stale = delete_netns(self.prefix)
        if stale:
            print(f"netns: deleted {len(stale)} stale namespaces from an earlier run: {' '.join(stale)}",
                  file=sys.stderr)
        if threading.current_thread() is threading.main_thread():
            self._previous_handlers = {sig: signal.signal(sig, _exit_on_signal) for sig in EXIT_SIGNALS}
        try:
            _run("ip", "netns", "add", self.hub)
            _run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.hub, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every child, then delete every namespace of this lab (idempotent).

        Exit signals are deferred meanwhile (it takes seconds to a minute): a SIGTERM that lands here must not cut
        the cleanup short, the way it would a ``finally`` block; once it is done, it ends the process.
        """
        deferred: list[int] = []
        if threading.current_thread() is threading.main_thread():
            for sig in (*EXIT_SIGNALS, signal.SIGINT):
                previous = signal.signal(sig, lambda signum, frame: deferred.append(signum))
                self._previous_handlers.setdefault(sig, previous)
        for child in self.children:
            if child.process.poll() is None:
                try:
                    child.process.stdin.close()  # type: ignore[union-attr]
                except OSError:
                    pass
        deadline = time.monotonic() + 30.0  # hivemind's orderly shutdown takes seconds on a loaded machine
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        delete_netns(self.prefix)
        for child in self.children:  # `ip netns exec` wrappers whose namespace is gone
            if child.process.poll() is None:
                child.process.kill()
                child.process.wait(timeout=5)
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}
        if deferred:
            raise SystemExit(128 + deferred[0])

    # -- topology --------------------------------------------------------------------------------------------

    def add_node(self, name: str, link: LinkSpec) -> Node:
        """A namespace with ``eth0`` on the hub's bridge, shaped as ``link`` says, and its relay if delayed."""
        if len(name) > 13:
            raise ValueError(f"node name {name!r} too long (interface names are at most 15 characters)")
        node = Node(name, self.prefix + name, f"{SUBNET}.{len(self.nodes) + 1}", link)
        port = f"v-{name}"
        _run("ip", "netns", "add", node.netns)
        self.nodes[name] = node
        _run("ip", "-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
        _run("ip", "-n", self.hub, "link", "set", port, "master", "br0", "up")
        _run("ip", "-n", node.netns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
        _run("ip", "-n", node.netns, "link", "set", "eth0", "up")
        _run("ip", "-n", node.netns, "link", "set", "lo", "up")
        for netns, iface, rate in ((node.netns, "eth0", link.up_mbit), (self.hub, port, link.down_mbit)):
            if rate is not None:
                _run("tc", "-n", netns, "qdisc", "add", "dev", iface, "root", "tbf", "rate", f"{rate}mbit",
                     "burst", str(link.burst_bytes), "latency", f"{link.queue_ms}ms")
        if link.delay_ms:
            relay = self.spawn(node, [sys.executable, os.path.abspath(__file__), "relay", "--listen",
                                      f"{node.ip}:{RELAY_PORT}", "--target", f"{node.ip}:{SERVICE_PORT}",
                                      "--delay-ms", str(link.delay_ms)], name=f"{name}-relay")
            relay.expect("ready", timeout=60)
        return node

    def cut_link(self, name: str) -> None:
        """Pull ``name``'s cable: its hub-side port ``v-<name>`` goes down, so nothing crosses the link either way.

        Cut on the hub side so the node keeps its own configuration (address, route, upload tbf) untouched; its
        ``eth0`` only loses carrier, the way a modem losing its line looks to the host. Processes and their open
        TCP connections stay, with packets to and from the node lost until ``restore_link``.
        """
        _run("ip", "-n", self.hub, "link", "set", f"v-{name}", "down")

    def restore_link(self, name: str) -> None:
        """Plug ``name``'s cable back (undoes ``cut_link``): the port stays a bridge member and keeps its tbf, so
        only ``up`` is needed; checks that the node's ``eth0`` has its carrier again."""
        _run("ip", "-n", self.hub, "link", "set", f"v-{name}", "up")
        deadline = time.monotonic() + 10.0
        while "LOWER_UP" not in _run("ip", "-n", self.nodes[name].netns, "link", "show", "dev", "eth0").stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: eth0 has no carrier 10 s after its link was restored")
            time.sleep(0.1)

    def counters(self, name: str) -> IfaceCounters:
        return read_counters(self.nodes[name].netns)

    def all_counters(self) -> dict[str, IfaceCounters]:
        return {name: self.counters(name) for name in self.nodes}

    def qdisc_stats(self, name: str) -> list[dict]:
        """tc's view of a node's shaping (sent bytes, drops, overlimits) on both ends of its link."""
        stats = []
        for netns, iface in ((self.nodes[name].netns, "eth0"), (self.hub, f"v-{name}")):
            out = _run("tc", "-n", netns, "-s", "-j", "qdisc", "show", "dev", iface, check=False).stdout
            stats.extend(json.loads(out) if out.strip() else [])
        return stats

    # -- processes -------------------------------------------------------------------------------------------

    def spawn(self, node: Node, argv: Sequence[str], name: Optional[str] = None,
              env: Optional[dict[str, str]] = None) -> Child:
        """Start ``argv`` inside ``node``'s namespace; its JSON stdout lines become ``Child.events``."""
        process = subprocess.Popen(
            ["ip", "netns", "exec", node.netns, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, env={**os.environ, **(env or {})},
        )
        child = Child(name or node.name, process)
        self.children.append(child)
        threading.Thread(target=_pump, args=(child, process.stdout), daemon=True).start()
        return child


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def emit(**event: Any) -> None:
    """Write one JSON event line for the parent (the child side of ``Child``)."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def commands() -> Iterator[dict]:
    """The parent's JSON commands on stdin, one per line, until it closes stdin (the child side of ``Child``)."""
    for line in sys.stdin:
        if line.strip():
            yield json.loads(line)


# -- latency relay ---------------------------------------------------------------------------------------------

async def _delayed_copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Forward everything from reader to writer, each chunk ``delay`` seconds after it arrived (pipelined), then
    pass the EOF on (a half-close: the other direction keeps flowing)."""
    chunks: asyncio.Queue = asyncio.Queue()

    async def read() -> None:
        while True:
            data = await reader.read(65536)
            await chunks.put((time.monotonic() + delay, data))
            if not data:
                return

    async def write() -> None:
        while True:
            due, data = await chunks.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    await asyncio.gather(read(), write())


async def _relay(listen: str, target: str, delay_ms: float) -> None:
    host, port = listen.rsplit(":", 1)
    target_host, target_port = target.rsplit(":", 1)
    delay = delay_ms / 1000.0

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(target_host, int(target_port))
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(_delayed_copy(client_reader, server_writer, delay),
                                 _delayed_copy(server_reader, client_writer, delay))
        except (ConnectionError, OSError):
            pass  # a reset on either side: closing both below ends the other direction too
        finally:
            client_writer.close()
            server_writer.close()

    server = await asyncio.start_server(handle, host, int(port))
    emit(event="ready", listen=listen, target=target, delay_ms=delay_ms)
    # until the parent closes our stdin (or dies): a relay never outlives its lab. Leave without cancelling the
    # connections' tasks one by one; their sockets go with the process.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    server.close()
    os._exit(0)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    relay = sub.add_parser("relay", help="TCP relay adding a fixed delay each way (runs inside a node's namespace)")
    relay.add_argument("--listen", required=True)
    relay.add_argument("--target", required=True)
    relay.add_argument("--delay-ms", type=float, required=True)
    sub.add_parser("cleanup", help="delete every cfh-* namespace (and its processes) a crashed run left behind")
    args = parser.parse_args(argv)
    if args.command == "relay":
        asyncio.run(_relay(args.listen, args.target, args.delay_ms))
    else:
        print("deleted:", " ".join(delete_netns("cfh-")) or "nothing")


if __name__ == "__main__":
    main()
