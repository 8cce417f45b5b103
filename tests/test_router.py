"""Three real replicas of the server behind Envoy (`deploy/envoy/envoy.yaml`), on loopback.

Requests go through the official `openai` client and plain HTTP; Envoy's x-gemma-replica
header names the replica that answered. Run with `-s` to see the measured figures.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psutil
import pytest
from openai import OpenAI

from deploy.local import REPLICA_HEADER
from server.testbed.default_model import DefaultModel
from tests.replica_cluster import ADMIN_KEY, Cluster, Load, running_cluster, wait_for

MODELS = ["tiny-gemma4", "demo-attn", "demo-mlp", "demo-all", "demo-pirate", "demo-tools"]
ASK = [{"role": "user", "content": "Tell me about the river."}]


@pytest.fixture(scope="module")
def cluster(tiny: DefaultModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tiny.model_dir.parent, tmp_path_factory.mktemp("replicas")) as started:
        yield started


def client(base_url: str) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=300)


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
        assert len(answered) == 1, f"{model} answered by {answered}"
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


def test_sigkill_of_a_replica_loses_no_request_that_had_not_started(cluster: Cluster) -> None:
    home = cluster.replica(replica_of(cluster, "demo-mlp"))
    retried = cluster.stat("cluster.replicas.upstream_rq_retry_success")
    with Load([cluster.url], MODELS, workers=4) as load:
        wait_for(lambda: len(load.outcomes) >= 12, 600, "load under way")
        killed = cluster.kill(home)
        failover = wait_for(lambda: cluster.health()[home.address] != "healthy", 30, "ejection")
        flagged = killed + failover
        time.sleep(8)
    after = [o for o in load.outcomes if o.started > killed]
    assert len(after) >= 8
    assert [o for o in after if o.status != 200] == [], "a request after the kill failed"
    failed = [o for o in load.outcomes if o.status != 200]
    assert all(o.started < killed < o.ended for o in failed), "only requests in flight fail"
    answered_dead = [o for o in load.outcomes if o.status == 200 and o.replica == home.address]
    assert all(o.ended < killed for o in answered_dead), "nothing answered by the dead replica"
    for model in MODELS:  # the survivors share the dead replica's models, each on one
        homes_after = {o.replica for o in after if o.model == model and o.started > flagged}
        assert len(homes_after) <= 1, (model, homes_after)
    print(
        f"\nrouter: SIGKILL to Envoy ejecting the replica {failover * 1000:.0f} ms under load; "
        f"{len(failed)} requests in flight on it failed, {len(after)} sent after the kill "
        f"all answered; retries "
        f"{cluster.stat('cluster.replicas.upstream_rq_retry_success') - retried}"
    )

    again = cluster.restart(home)
    wait_for(lambda: replica_of(cluster, "demo-mlp") == again.address, 10, "back home")
    models = {m.id for m in client(again.base_url).models.list().data}
    assert set(MODELS) <= models
