"""The Envoy config of `deploy/envoy/` on a real Envoy, in front of small fake upstreams.

Fast checks of the routing logic (the Lua filter's reading of "model", hashing, retries,
ejection, streaming) where the upstream's behaviour must be exact; `tests/test_router.py` runs
the same config in front of real replicas.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from deploy.envoy.render import TEMPLATE, dump, main, render
from deploy.local import (
    REPLICA_HEADER,
    Process,
    envoy_binary,
    host_health,
    start_envoy,
    wait_routable,
    wait_until,
)
from tests.live_server import free_port


@dataclass
class FakeUpstream:
    """An HTTP/1.1 server that echoes what it received: the routed-model header and body size."""

    api_status: int = 200  # status of every answer but /ready
    ready_status: int = 200
    delay: float = 0.0  # seconds before each answer but /ready: a generation's length
    server: ThreadingHTTPServer = field(init=False)
    connections: set[socket.socket] = field(default_factory=set)

    def __post_init__(self) -> None:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                upstream.connections.add(self.connection)

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _answer(self, status: int, payload: dict[str, object]) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/ready":
                    self._answer(upstream.ready_status, {})
                elif self.path == "/stream":
                    self._stream()
                else:
                    self._echo(0)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                self._echo(len(self.rfile.read(length)))

            def _echo(self, body_bytes: int) -> None:
                time.sleep(upstream.delay)
                model = self.headers.get("x-gemma-model")
                self._answer(upstream.api_status, {"model": model, "body_bytes": body_bytes})

            def _stream(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for index in range(5):
                    event = f"data: {index}\n\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                    self.wfile.flush()
                    time.sleep(0.4)
                self.wfile.write(b"0\r\n\r\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        """Stop as a killed process does: close every connection, refuse new ones."""
        self.server.shutdown()
        self.server.server_close()
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()


@dataclass
class Front:
    envoy: Process
    url: str
    admin_url: str
    upstreams: list[FakeUpstream]

    def upstream(self, address: str) -> FakeUpstream:
        return next(u for u in self.upstreams if u.address == address)


@contextlib.contextmanager
def envoy_front(tmp_path: Path) -> Iterator[Front]:
    """Envoy on `deploy/envoy/envoy.yaml` in front of three fake upstreams."""
    upstreams = [FakeUpstream() for _ in range(3)]
    port, admin_port = free_port(), free_port()
    addresses = [u.address for u in upstreams]
    envoy = start_envoy(addresses, tmp_path, port, admin_port)
    try:
        admin_url = f"http://127.0.0.1:{admin_port}"
        wait_until(f"{admin_url}/ready", timeout=60, what="envoy")
        wait_routable(admin_url, addresses)
        yield Front(envoy, f"http://127.0.0.1:{port}", admin_url, upstreams)
    finally:
        envoy.stop(10)
        for upstream in upstreams:
            upstream.close()


@pytest.fixture(scope="module")
def shared_front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    """For tests that change no upstream's behaviour."""
    with envoy_front(tmp_path_factory.mktemp("envoy")) as started:
        yield started


@pytest.fixture
def front(tmp_path: Path) -> Iterator[Front]:
    """For tests that fail or stop upstreams."""
    with envoy_front(tmp_path) as started:
        yield started


def stat(front: Front, name: str) -> int:
    text = httpx.get(f"{front.admin_url}/stats", params={"filter": f"^{name}$"}).text
    return int(text.split(":")[1]) if text.strip() else 0


def test_the_config_validates_and_renders_for_other_addresses(tmp_path: Path) -> None:
    template = yaml.safe_load(TEMPLATE.read_text())
    defaults = [("127.0.0.1", 8001), ("127.0.0.1", 8002), ("127.0.0.1", 8003)]
    assert render(defaults) == template, "rendering the defaults gives envoy.yaml itself"

    out = tmp_path / "envoy.yaml"
    main(["10.0.0.5:8000", "10.0.0.6:8000", "--listen", "0.0.0.0:80", "-o", str(out)])
    rendered = yaml.safe_load(out.read_text())
    (cluster,) = rendered["static_resources"]["clusters"]
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"] for e in endpoints] == [
        {"address": "10.0.0.5", "port_value": 8000},
        {"address": "10.0.0.6", "port_value": 8000},
    ]
    listener = rendered["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": "0.0.0.0", "port_value": 80}
    assert (
        rendered["static_resources"]["listeners"][0]["filter_chains"]
        == (template["static_resources"]["listeners"][0]["filter_chains"])
    )
    for path in (TEMPLATE, out):
        check = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(path)],
            capture_output=True,
            timeout=120,
        )
        assert check.returncode == 0, check.stdout.decode()[-2000:]
    assert dump(render(defaults)).startswith("# Rendered by")
    with pytest.raises(SystemExit):
        main(["no-port"])


BASE64_NOISE = "iVBORw0KGgoAAAANSUhEUgAA+/=" * 80_000  # ~2 MB of what images look like


@pytest.mark.parametrize(
    ("body", "header"),
    [
        ('{"model": "demo-attn", "messages": []}', "demo-attn"),
        ('  {"messages":[],"model":"late"}', "late"),
        (
            # Nested "model" keys and quoted ones inside strings come before the real one.
            '{"metadata": {"model": "nested"}, "tools": [{"model": "in-array"}],'
            ' "messages": [{"role": "user", "content": "say \\"model\\": \\"quoted\\" \\\\"}],'
            ' "model" : "top-level"}',
            "top-level",
        ),
        (
            f'{{"messages": [{{"content": "{BASE64_NOISE}"}}], "model": "after-media"}}',
            "after-media",
        ),
        ('{"model": "with spaces"}', None),
        ('{"model": "a\\"b"}', None),
        ('{"model": 5, "x": "y"}', None),
        ('{"model": ["demo-attn"]}', None),
        ('["model", "demo-attn"]', None),
        ("not json at all", None),
        ('{"model": "unterminated', None),
        ('{"name": "x", "path": "extra/demo-mlp"}', None),
        ('{"model": "gemma-4-E4B-it/v2:latest_1.0"}', "gemma-4-E4B-it/v2:latest_1.0"),
    ],
)
def test_the_lua_filter_reads_the_top_level_model(
    shared_front: Front, body: str, header: str | None
) -> None:
    response = httpx.post(
        f"{shared_front.url}/v1/chat/completions",
        content=body.encode(),
        headers={"Content-Type": "application/json", "x-gemma-model": "forged"},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.json() == {"model": header, "body_bytes": len(body.encode())}


def test_requests_without_a_json_body_are_routed_without_a_model(shared_front: Front) -> None:
    answered = set()
    for _ in range(30):
        response = httpx.get(f"{shared_front.url}/v1/models", headers={"x-gemma-model": "forged"})
        assert response.status_code == 200
        assert response.json()["model"] is None, "a client cannot choose the replica"
        answered.add(response.headers[REPLICA_HEADER])
    assert len(answered) > 1, "requests without a model spread over the replicas"

    upload = httpx.post(
        f"{shared_front.url}/v1/adapters",
        files={"adapter_model.safetensors": b"\0" * 300_000},
        data={"name": "x", "model": "in-a-form-field"},
    )
    assert upload.status_code == 200
    assert upload.json()["model"] is None, "multipart bodies pass unread"
    assert upload.json()["body_bytes"] > 300_000


def test_each_model_sticks_to_one_replica_and_models_spread(shared_front: Front) -> None:
    served_by: dict[str, set[str]] = {}
    with httpx.Client(base_url=shared_front.url) as client:
        for round_ in range(3):
            for index in range(40):
                model = f"adapter-{index}"
                body = {"model": model, "messages": [{"role": "user", "content": str(round_)}]}
                response = client.post("/v1/chat/completions", json=body)
                assert response.json()["model"] == model
                served_by.setdefault(model, set()).add(response.headers[REPLICA_HEADER])
    assert all(len(replicas) == 1 for replicas in served_by.values()), served_by
    assert len(set().union(*served_by.values())) == 3, "40 adapters spread over 3 replicas"


def wait_for_flag(front: Front, replica: str, flag: str, timeout: float) -> float:
    """Seconds until Envoy flags `replica` with `flag` (e.g. `/failed_active_hc`)."""
    started = time.monotonic()
    while flag not in host_health(front.admin_url)[replica]:
        assert time.monotonic() - started < timeout, host_health(front.admin_url)
        time.sleep(0.01)
    return time.monotonic() - started


def _replica_of(front: Front, model: str) -> str:
    response = httpx.post(f"{front.url}/v1/completions", json={"model": model, "prompt": "x"})
    return response.headers[REPLICA_HEADER]


def test_a_503_is_retried_on_another_replica_and_an_unready_one_is_ejected(front: Front) -> None:
    home = _replica_of(front, "demo-attn")
    front.upstream(home).api_status = 503
    retried_before = stat(front, "cluster.replicas.upstream_rq_retry_success")
    for _ in range(5):
        response = httpx.post(f"{front.url}/v1/completions", json={"model": "demo-attn"})
        assert response.status_code == 200
        assert response.headers[REPLICA_HEADER] != home
        assert response.headers["x-envoy-attempt-count"] == "2", "the client can see the retry"
    assert stat(front, "cluster.replicas.upstream_rq_retry_success") - retried_before == 5
    moved_to = {_replica_of(front, "demo-attn") for _ in range(3)}
    assert len(moved_to) == 1, "the adapter moves to one other replica: the next on the ring"

    front.upstream(home).api_status = 200
    front.upstream(home).ready_status = 503  # /ready fails: the health checks keep it out
    wait_for_flag(front, home, "/failed_active_hc", timeout=10)
    front.upstream(home).ready_status = 200
    wait_routable(front.admin_url, [home], timeout=20)  # the ejection ends after 5 s
    back = time.monotonic()
    while _replica_of(front, "demo-attn") != home:  # the workers' rings follow in a moment
        assert time.monotonic() - back < 5, "back on its replica once ready again"
        time.sleep(0.05)


def test_a_replica_failing_under_load_has_every_request_retried(front: Front) -> None:
    """A retry stays active while its new attempt runs: the budget must cover half the load."""
    home = _replica_of(front, "demo-tools")
    front.upstream(home).api_status = 503
    for upstream in front.upstreams:
        upstream.delay = 1.0  # the retries run long on the others, as generations do
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(
            pool.map(
                lambda _: httpx.post(
                    f"{front.url}/v1/completions", json={"model": "demo-tools"}, timeout=30
                ),
                range(12),
            )
        )
    assert [a.status_code for a in answers] == [200] * 12, [a.text for a in answers]
    assert stat(front, "cluster.replicas.upstream_rq_retry_overflow") == 0


def test_a_refused_connection_is_retried_elsewhere_and_ejects_the_replica(front: Front) -> None:
    home = _replica_of(front, "demo-mlp")
    front.upstream(home).close()
    killed = time.monotonic()
    response = httpx.post(f"{front.url}/v1/completions", json={"model": "demo-mlp"})
    assert response.status_code == 200, "the request that found no replica went elsewhere"
    assert response.headers[REPLICA_HEADER] != home
    wait_for_flag(front, home, "/failed_outlier_check", timeout=15)
    ejected = time.monotonic() - killed
    print(f"\nrefused connection: replica ejected {ejected:.3f} s after it closed")
    for _ in range(10):
        response = httpx.post(f"{front.url}/v1/completions", json={"model": "demo-mlp"})
        assert response.status_code == 200
        assert response.headers[REPLICA_HEADER] != home


def test_server_sent_events_pass_through_unbuffered(shared_front: Front) -> None:
    started = time.monotonic()
    arrivals = []
    with httpx.stream("GET", f"{shared_front.url}/stream", timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 5
    assert arrivals[0] < 1.0 and arrivals[-1] - arrivals[0] > 1.4, arrivals  # 0.4 s apart
