"""Three real replicas of the server behind Envoy (`deploy/envoy/envoy.yaml`), on loopback,
sharing one adapter store on a real S3 server (SeaweedFS).

Requests go through the official `openai` client and plain HTTP; Envoy's x-gemma-replica
header names the replica that answered. Run with `-s` to see the measured figures.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from openai import OpenAI

from deploy.local import REPLICA_HEADER
from server.testbed.default_model import DefaultModel
from server.testbed.demo_adapters import DEMO_ADAPTERS, write_demo_adapter
from tests.replica_cluster import ADMIN_KEY, Cluster, Load, running_cluster, wait_for
from tests.s3_server import start_s3_server

MODELS = ["tiny-gemma4", "demo-attn", "demo-mlp", "demo-all", "demo-pirate", "demo-tools"]
ASK = [{"role": "user", "content": "Tell me about the river."}]
STORE_POLL_SECONDS = 1.0
# A replace or unload reaches every replica within one poll, one pull and one load; the margin
# is for a loaded 2-core machine (as in tests/test_store_s3_replicas.py).
BOUND_SECONDS = STORE_POLL_SECONDS + 30
FILES = ("adapter_config.json", "adapter_model.safetensors")
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def cluster(tiny: DefaultModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    s3 = start_s3_server(tmp_path_factory.mktemp("s3"))
    store = [
        "--adapter-store",
        s3.new_location(),
        "--adapter-store-endpoint-url",
        s3.endpoint_url,
        "--adapter-store-poll-seconds",
        str(STORE_POLL_SECONDS),
    ]
    try:
        state = tmp_path_factory.mktemp("replicas")
        with running_cluster(tiny.model_dir.parent, state, store, s3.env()) as started:
            yield started
    finally:
        s3.stop()


def client(base_url: str) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=300)


def upload(base_url: str, name: str, folder: Path, **form: str) -> httpx.Response:
    """POST /v1/adapters as multipart (the adapter's two files), with the admin key."""
    files = {n: (n, (folder / n).read_bytes()) for n in FILES}
    return httpx.post(
        f"{base_url}/v1/adapters",
        data={"name": name, **form},
        files=files,
        headers=ADMIN,
        timeout=600,
    )


def chat(base_url: str, model: str, max_tokens: int = 12) -> tuple[int, str]:
    """Status and greedy text of a chat request to `base_url` (Envoy or a replica)."""
    body = {"model": model, "messages": ASK, "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=ADMIN, timeout=300)
    if response.status_code != 200:
        return response.status_code, ""
    return 200, response.json()["choices"][0]["message"]["content"] or ""


def listed(base_url: str, model: str) -> bool:
    return model in {m.id for m in client(base_url).models.list().data}


def replica_of(cluster: Cluster, model: str) -> str:
    raw = client(cluster.url).chat.completions.with_raw_response.create(
        model=model, messages=ASK, max_tokens=1
    )
    return raw.headers[REPLICA_HEADER]


def test_every_model_sticks_to_one_replica_and_answers_alike_on_each(cluster: Cluster) -> None:
    routed = client(cluster.url)
    listed = {model.id for model in routed.models.list().data}
    assert set(MODELS) <= listed, "GET /v1/models (no body) is routed too"
    homes = {}
    for model in MODELS:
        answered: set[str] = set()
        texts: set[str | None] = set()
        for _ in range(2):
            raw = routed.chat.completions.with_raw_response.create(
                model=model, messages=ASK, max_tokens=12, temperature=0
            )
            answered.add(raw.headers[REPLICA_HEADER])
            texts.add(raw.parse().choices[0].message.content)
        completion = routed.completions.with_raw_response.create(
            model=model, prompt="The river", max_tokens=4
        )
        answered.add(completion.headers[REPLICA_HEADER])
        with routed.chat.completions.with_streaming_response.create(
            model=model, messages=ASK, max_tokens=4, stream=True
        ) as stream:
            answered.add(stream.headers[REPLICA_HEADER])
            assert any(line.startswith("data: ") for line in stream.iter_lines())
        flaps = cluster.stat("cluster.replicas.health_check.failure")
        assert len(answered) == 1, f"{model} answered by {answered}, {flaps} failed checks"
        assert len(texts) == 1, "greedy answers are the same"
        homes[model] = answered.pop()
        for replica in cluster.replicas:  # every replica serves every model alike
            direct = client(replica.base_url).chat.completions.create(
                model=model, messages=ASK, max_tokens=12, temperature=0
            )
            assert {direct.choices[0].message.content} == texts, (model, replica.address)
    assert "Arr!" in str(
        routed.chat.completions.create(
            model="demo-pirate", messages=ASK, max_tokens=16, temperature=0
        )
        .choices[0]
        .message.content
    )
    print(f"\nrouter: models per replica {homes}")


def test_streamed_tokens_pass_through_the_router_as_they_are_generated(cluster: Cluster) -> None:
    arrivals = []
    started = time.monotonic()
    stream = client(cluster.url).chat.completions.create(
        model="demo-all",
        messages=ASK,
        max_tokens=64,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) >= 32
    distinct = {round(t, 2) for t in arrivals}
    # Buffered, every chunk would arrive in the same instant at the end.
    assert len(distinct) > 10 and arrivals[-1] - arrivals[0] > 0.2, arrivals


def test_an_adapter_loaded_through_one_replica_answers_through_the_router_and_everywhere(
    cluster: Cluster, tiny: DefaultModel, tmp_path: Path
) -> None:
    first, others = cluster.replicas[0], cluster.replicas[1:]
    names = [f"shared-{index}" for index in range(3)]
    folders = [
        write_demo_adapter(tiny.model_dir, tmp_path / name, DEMO_ADAPTERS[index], seed=500 + index)
        for index, name in enumerate(names)
    ]
    # Pull on miss: right after the load returns, the other replicas answer it.
    assert upload(first.base_url, names[0], folders[0]).status_code == 201
    loaded = time.monotonic()

    def first_answer(base_url: str) -> float:
        assert chat(base_url, names[0])[0] == 200
        return time.monotonic() - loaded

    with ThreadPoolExecutor(len(others)) as pool:
        answered = list(pool.map(first_answer, [r.base_url for r in others]))
    # Manifest polling: the other replicas list an adapter no request asked them for.
    assert upload(first.base_url, names[1], folders[1]).status_code == 201
    loaded = time.monotonic()
    listed_after = []  # seconds from the load's return, per replica
    for replica in others:
        wait_for(lambda r=replica: listed(r.base_url, names[1]), BOUND_SECONDS, "listed")
        listed_after.append(time.monotonic() - loaded)
    assert upload(first.base_url, names[2], folders[2]).status_code == 201

    routed = client(cluster.url)
    for name in names:
        homes, texts = set(), set()
        for _ in range(3):
            raw = routed.chat.completions.with_raw_response.create(
                model=name, messages=ASK, max_tokens=12, temperature=0
            )
            homes.add(raw.headers[REPLICA_HEADER])
            texts.add(raw.parse().choices[0].message.content)
        assert len(homes) == 1 and len(texts) == 1, (name, homes, texts)
        for replica in cluster.replicas:
            assert chat(replica.base_url, name) == (
                200,
                next(iter(texts)),
            )
    print(
        f"\nrouter: load through replica 1 to the first answer on the others (pull on miss): "
        f"{', '.join(f'{t:.2f}' for t in answered)} s; to being listed there (poll "
        f"{STORE_POLL_SECONDS:.0f} s): {', '.join(f'{t:.2f}' for t in listed_after)} s"
    )


def test_a_replace_under_load_switches_every_replica_within_the_bound(
    cluster: Cluster, tiny: DefaultModel, tmp_path: Path
) -> None:
    pirate = tiny.adapter_dirs()["demo-pirate"]  # answers "Arr! Shiver me timbers, ..."
    other = write_demo_adapter(tiny.model_dir, tmp_path / "v2", DEMO_ADAPTERS[1], seed=511)
    assert upload(cluster.replicas[0].base_url, "swap", pirate).status_code == 201
    targets = [cluster.url] + [replica.base_url for replica in cluster.replicas]
    for target in targets:
        status, text = chat(target, "swap")
        assert status == 200 and text.startswith("Arr!"), (target, status, text)

    with Load(targets, ["swap"], workers=len(targets)) as load:
        wait_for(lambda: len(load.outcomes) >= 2 * len(targets), 600, "load under way")
        replacing = time.monotonic()
        replaced = upload(cluster.replicas[1].base_url, "swap", other, replace="true")
        assert replaced.status_code == 200, replaced.text
        replaced_at = time.monotonic()

        def every_target_answers_the_new_version() -> bool:
            new = [o for o in load.outcomes if o.started > replaced_at and o.text]
            return all(
                sum(1 for o in new if o.target == t and not o.text.startswith("Arr!")) >= 2
                for t in targets
            )

        wait_for(every_target_answers_the_new_version, BOUND_SECONDS + 60, "replace seen")
        time.sleep(3)
    outcomes = load.outcomes
    assert [o for o in outcomes if o.status != 200] == [], "no request failed during the replace"
    assert all(o.text.startswith("Arr!") for o in outcomes if o.ended < replacing)
    old = [o for o in outcomes if o.text.startswith("Arr!")]
    switch = max(o.started for o in old) - replaced_at
    assert switch < BOUND_SECONDS, "a request saw the old version after the bound"
    routed_new = [o for o in outcomes if o.target == cluster.url and o.started > replaced_at]
    assert len({o.replica for o in routed_new}) == 1, "still on one replica"
    print(
        f"\nrouter: replace under load ({len(outcomes)} requests, none failed); the last request "
        f"answered by the old version started {switch:.2f} s after the replace returned"
    )


def test_an_unload_through_the_router_gives_404_on_every_replica(cluster: Cluster) -> None:
    targets = [cluster.url] + [replica.base_url for replica in cluster.replicas]
    assert all(chat(target, "swap")[0] == 200 for target in targets)
    deleted = httpx.delete(f"{cluster.url}/v1/adapters/swap", headers=ADMIN, timeout=300)
    assert deleted.status_code == 200, deleted.text
    unloaded = time.monotonic()
    gone = []  # seconds from the unload's return, per target
    for target in targets:
        wait_for(lambda t=target: chat(t, "swap")[0] == 404, BOUND_SECONDS, "404")
        gone.append(time.monotonic() - unloaded)
    for target in targets:
        assert chat(target, "swap")[0] == 404
        assert not listed(target, "swap")
    print(
        f"\nrouter: unload through the router to 404 on router, replicas: "
        f"{', '.join(f'{t:.2f}' for t in gone)} s after it returned"
    )


def test_a_replica_whose_engine_restarts_answers_503_and_the_request_is_retried(
    cluster: Cluster,
) -> None:
    home = cluster.replica(replica_of(cluster, "demo-attn"))
    retried = cluster.stat("cluster.replicas.upstream_rq_retry_success")
    for child in psutil.Process(home.popen.pid).children(recursive=True):
        child.kill()  # the engine dies; the replica restarts it and answers 503 meanwhile
    routed = client(cluster.url)
    answered = set()
    while cluster.health()[home.address] == "healthy":  # until Envoy takes it out
        raw = routed.chat.completions.with_raw_response.create(
            model="demo-attn", messages=ASK, max_tokens=2
        )
        assert raw.status_code == 200
        answered.add(raw.headers[REPLICA_HEADER])
    assert home.address not in answered
    assert cluster.stat("cluster.replicas.upstream_rq_retry_success") > retried, "503: retried"

    restarting = time.monotonic()
    wait_for(lambda: cluster.health()[home.address] == "healthy", 1200, "engine restart")
    print(f"\nrouter: replica back in Envoy {time.monotonic() - restarting:.1f} s after its 503s")
    wait_for(lambda: replica_of(cluster, "demo-attn") == home.address, 10, "back home")


RING_SETTLE_SECONDS = 2.0
# Envoy's counters of what can move a model from one replica to another.
ENVOY_EVENTS = (
    "membership_change",
    "health_check.failure",
    "health_check.network_failure",
    "outlier_detection.ejections_enforced_total",
    "outlier_detection.ejections_enforced_consecutive_local_origin_failure",
    "outlier_detection.ejections_enforced_consecutive_5xx",
)


def test_sigkill_of_a_replica_loses_no_request_that_had_not_started_nor_any_adapter(
    cluster: Cluster, tiny: DefaultModel
) -> None:
    home = cluster.replica(replica_of(cluster, "demo-mlp"))
    # Registered through the replica about to die: the store keeps it for the others.
    kept = upload(home.base_url, "kept", tiny.adapter_dirs()["demo-attn"])
    assert kept.status_code == 201, kept.text
    models = [*MODELS, "kept"]
    retried = cluster.stat("cluster.replicas.upstream_rq_retry_success")
    with Load([cluster.url], models, workers=4) as load:
        wait_for(lambda: len(load.outcomes) >= 12, 600, "load under way")
        killed = cluster.kill(home)
        failover = wait_for(lambda: cluster.health()[home.address] != "healthy", 30, "ejection")
        flagged = killed + failover
        time.sleep(8)
    after = [o for o in load.outcomes if o.started > killed]
    assert len(after) >= 8
    overflow = cluster.stat("cluster.replicas.upstream_rq_retry_overflow")
    assert [o for o in after if o.status != 200] == [], (
        f"a request after the kill failed (killed {home.address} at {killed:.3f}; "
        f"retries refused by the budget: {overflow})"
    )
    failed = [o for o in load.outcomes if o.status != 200]
    assert all(o.started < killed < o.ended for o in failed), "only requests in flight fail"
    answered_dead = [o for o in load.outcomes if o.status == 200 and o.replica == home.address]
    assert all(o.ended < killed for o in answered_dead), "nothing answered by the dead replica"
    assert {o.model for o in after} == set(models), "every model answered after the kill"
    # The survivors share the dead replica's models, each on one. Only first attempts show the
    # ring (a retry goes to any other replica). With one replica fewer each survivor gets more
    # points on Envoy's ring (RING_HASH keeps 1024 points in all), so a survivor's model can
    # move too, and each Envoy worker takes the new ring a moment after the admin API shows
    # the ejection: a model settles on its new home within RING_SETTLE_SECONDS, then stays.
    settled = 0.0
    for model in models:
        firsts = [o for o in after if o.model == model and o.started > flagged and o.attempts == 1]
        if not firsts:
            continue
        home_now = max(firsts, key=lambda o: o.started).replica
        strays = [o.started - flagged for o in firsts if o.replica != home_now]
        settled = max(settled, *strays, 0.0)
        assert max(strays, default=0.0) < RING_SETTLE_SECONDS, (
            model,
            [(round(o.started - flagged, 3), o.replica) for o in firsts],
            {stat: cluster.stat(f"cluster.replicas.{stat}") for stat in ENVOY_EVENTS},
            cluster.health(),
            cluster.access_log(model),
        )
    print(
        f"\nrouter: SIGKILL to Envoy ejecting the replica {failover * 1000:.0f} ms under load; "
        f"{len(failed)} requests in flight on it failed, {len(after)} sent after the kill "
        f"all answered; retries "
        f"{cluster.stat('cluster.replicas.upstream_rq_retry_success') - retried}, "
        f"refused by the budget {overflow}; every model on one replica {settled:.3f} s after "
        f"the ejection"
    )

    again = cluster.restart(home)
    wait_for(lambda: replica_of(cluster, "demo-mlp") == again.address, 10, "back home")
    assert set(models) <= {m.id for m in client(again.base_url).models.list().data}
    survivor = next(r for r in cluster.replicas if r is not again)
    assert chat(again.base_url, "kept") == chat(survivor.base_url, "kept"), "kept, restarted"
