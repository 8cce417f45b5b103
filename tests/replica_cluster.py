"""Three replicas of `python -m server` on the tiny model with Envoy in front, for the tests.

The replicas run as users run them (`--dtype auto`), with the small KV cache of the other tests
(64 MiB, 1024 tokens), started 20 s apart so their engine start-ups share the two cores.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from deploy.local import (
    REPLICA_HEADER,
    Process,
    Replica,
    host_health,
    start_envoy,
    start_replica,
    start_replicas,
    wait_routable,
    wait_until,
)
from tests.live_server import free_port

ADMIN_KEY = "router-admin-key"
START_TIMEOUT = 1200.0  # engine start-ups take minutes on a loaded 2-core machine


def replica_flags(cache_dir: Path, *extra: str) -> list[str]:
    """Flags of every test replica: the tiny model's cache, small KV cache, an admin key."""
    return [
        "--cache-dir",
        str(cache_dir),
        "--max-model-len",
        "1024",
        "--kv-cache-memory-bytes",
        str(64 * 2**20),
        "--admin-keys",
        ADMIN_KEY,
        *extra,
    ]


@dataclass
class Cluster:
    """The replicas, Envoy, and where to reach them."""

    replicas: list[Replica]
    envoy: Process
    url: str  # Envoy, for clients
    admin_url: str  # Envoy's admin interface
    flags: list[str]
    env: dict[str, str]

    def replica(self, address: str) -> Replica:
        """The replica at host:port (as Envoy's x-gemma-replica names it)."""
        return next(r for r in self.replicas if r.address == address)

    def access_log(self, model: str, last: int = 40) -> list[str]:
        """Envoy's last access-log lines for `model` (status, flags, replica, attempts)."""
        lines = self.envoy.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if f" model={model} " in line][-last:]

    def health(self) -> dict[str, str]:
        return host_health(self.admin_url)

    def stat(self, name: str) -> int:
        """One of Envoy's counters, e.g. `cluster.replicas.upstream_rq_retry_success`."""
        text = httpx.get(f"{self.admin_url}/stats", params={"filter": f"^{name}$"}).text
        return int(text.split(":")[1]) if text.strip() else 0

    def kill(self, replica: Replica) -> float:
        """SIGKILL a replica and its engine processes at once; returns the monotonic time."""
        killed = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(replica.popen.pid, signal.SIGKILL)
        replica.popen.wait(30)
        return killed

    def restart(self, replica: Replica) -> Replica:
        """Start a killed replica again on its port and state folder; wait until routable."""
        index = self.replicas.index(replica)
        again = start_replica(replica.port, replica.log_path.parent, self.flags, self.env)
        self.replicas[index] = again
        wait_until(f"{again.base_url}/ready", timeout=START_TIMEOUT, what=again.name)
        wait_routable(self.admin_url, [again.address], timeout=30)
        return again


@contextlib.contextmanager
def running_cluster(
    cache_dir: Path,
    state_root: Path,
    extra_flags: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """Three replicas and Envoy; everything is stopped on exit."""
    flags = replica_flags(cache_dir, *extra_flags)
    env = env or {}
    ports = [free_port() for _ in range(3)]
    replicas = start_replicas(ports, state_root, flags, START_TIMEOUT, stagger_seconds=20, env=env)
    port, admin_port = free_port(), free_port()
    envoy = start_envoy([r.address for r in replicas], state_root / "envoy", port, admin_port)
    urls = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    cluster = Cluster(replicas, envoy, *urls, flags, env)
    try:
        wait_until(f"{cluster.admin_url}/ready", timeout=60, what="envoy")
        wait_routable(cluster.admin_url, [r.address for r in replicas])
        yield cluster
    finally:
        envoy.stop(10)
        for replica in cluster.replicas:
            replica.stop(60)


@dataclass
class Outcome:
    """One request of a load run."""

    target: str  # the base URL it was sent to: Envoy or one replica
    model: str
    started: float  # monotonic
    ended: float
    status: int | None  # None: no HTTP answer at all
    replica: str | None  # Envoy's x-gemma-replica
    text: str = ""  # the answer's content (200 only)
    error: str = ""  # the start of the body of any other answer, to tell who refused it
    attempts: int = 1  # Envoy's x-envoy-attempt-count: more than 1 if it retried the request


@dataclass
class Load:
    """Concurrent greedy chat requests until stopped, each one recorded.

    Worker k sends to targets[k % len(targets)], cycling through the models.
    """

    targets: Sequence[str]
    models: Sequence[str]
    workers: int = 4
    max_tokens: int = 8
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _run(self, worker: int) -> None:
        target = self.targets[worker % len(self.targets)]
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with httpx.Client(base_url=target, timeout=300, headers=headers) as client:
            index = worker
            while not self._stop.is_set():
                model = self.models[index % len(self.models)]
                index += 1
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": "Tell me about the river."}],
                    "max_tokens": self.max_tokens,
                    "temperature": 0,
                }
                started = time.monotonic()
                try:
                    response = client.post("/v1/chat/completions", json=body)
                except httpx.TransportError:
                    self.outcomes.append(
                        Outcome(target, model, started, time.monotonic(), None, None)
                    )
                    continue
                text = error = ""
                if response.status_code == 200:
                    text = response.json()["choices"][0]["message"]["content"] or ""
                else:
                    error = response.text[:300]
                self.outcomes.append(
                    Outcome(
                        target,
                        model,
                        started,
                        time.monotonic(),
                        response.status_code,
                        response.headers.get(REPLICA_HEADER),
                        text,
                        error,
                        int(response.headers.get("x-envoy-attempt-count", 1)),
                    )
                )

    def __enter__(self) -> Load:
        for worker in range(self.workers):
            thread = threading.Thread(target=self._run, args=(worker,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(600)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `condition` every 10 ms; seconds it took to hold."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what}: not after {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - started
