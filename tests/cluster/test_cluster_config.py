"""Cluster configuration: replica counts validated up front and against the servers, and a
node on a three-server cluster whose discovery bucket and KV-event stream have 3 copies."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from actors.nats.replicas import ReplicasError, check_replicas, servers_reported
from supervisor.config import ConfigError, loads
from supervisor.nats_cluster import NatsCluster
from tests.node.harness import NatsServer, start_node

EXTERNAL = '[nats]\nembedded = false\nurl = ["nats://a:4222", "nats://b:4222"]\n'


def test_replicas_default_to_one_and_servers_are_shuffled_by_default() -> None:
    config = loads("")
    assert (config.discovery.replicas, config.events.replicas) == (1, 1)
    assert config.nats.randomize is True
    config = loads(EXTERNAL + "randomize = false\n[discovery]\nreplicas = 3\n")
    assert config.nats.url == ["nats://a:4222", "nats://b:4222"]
    assert config.discovery.replicas == 3
    assert config.nats.randomize is False


@pytest.mark.parametrize(
    ("toml", "key", "problem"),
    [
        ("[discovery]\nreplicas = 2\n", "discovery.replicas", "must be odd"),
        ("[events]\nreplicas = 4\n", "events.replicas", "must be odd"),
        ("[discovery]\nreplicas = 7\n", "discovery.replicas", "<= 5"),
        ("[events]\nreplicas = 0\n", "events.replicas", ">= 1"),
    ],
)
def test_replica_counts_out_of_range_or_even_are_refused(toml: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads(EXTERNAL + toml)
    assert caught.value.key == key
    assert problem in caught.value.problem


def test_the_embedded_server_takes_one_copy_only() -> None:
    with pytest.raises(ConfigError) as caught:
        loads("[discovery]\nreplicas = 3\n")
    assert caught.value.key == "discovery.replicas"
    assert "need a NATS cluster" in caught.value.problem


def test_replicas_are_checked_against_the_servers_the_info_reports() -> None:
    alone = {"server_name": "s", "connect_urls": ["127.0.0.1:4222"]}
    three = {"server_name": "s", "cluster": "c", "connect_urls": ["a:1", "b:1", "c:1"]}
    two_up = {**three, "connect_urls": ["a:1", "b:1"]}
    assert (servers_reported(alone), servers_reported(three), servers_reported(two_up)) == (1, 3, 2)
    assert check_replicas({"discovery.replicas": 3}, three) == ""
    assert "reports 2 server(s)" in check_replicas({"discovery.replicas": 3}, two_up)
    with pytest.raises(ReplicasError, match=r"discovery\.replicas = 3.*not part of a cluster"):
        check_replicas({"discovery.replicas": 3}, alone)


def test_a_node_asking_for_three_copies_of_a_lone_server_fails_to_start_saying_why(
    tmp_path: Path,
) -> None:
    server = NatsServer(tmp_path)
    node = start_node(
        tmp_path,
        embedded_nats=False,
        nats_url=server.url,
        discovery={"replicas": 3},
        supervision={"intensity": 0},
    )
    try:
        assert node.proc.wait(60) == 1
        text = node.log_path.read_text()
        assert "discovery.replicas = 3, but the NATS server" in text
        assert "not part of a cluster" in text
    finally:
        node.kill()
        server.stop()


@pytest.fixture
def cluster() -> Iterator[NatsCluster]:
    with NatsCluster() as fabric:
        yield fabric


def test_a_node_on_the_cluster_keeps_three_copies_of_discovery_and_its_kv_events(
    tmp_path: Path, cluster: NatsCluster
) -> None:
    urls = cluster.urls[1:] + cluster.urls[:1]
    node = start_node(
        tmp_path,
        embedded_nats=False,
        nats_url=urls[0],
        nats={"url": urls, "randomize": False},
        discovery={"replicas": 3},
        events={"durable": True, "replicas": 3},
    )
    try:
        node.wait_ready(60)
        node.wait_log(lambda r: r.get("event") == "registered", timeout=30)

        async def copies() -> tuple[int, int, int]:
            nc = await nats.connect(cluster.urls)
            try:
                js = nc.jetstream()
                bucket = await js.stream_info("KV_sgl_node_instances")
                events = await js.stream_info("KV_EVENTS_dynamo_backend")
                assert bucket.cluster is not None
                assert events.cluster is not None
                return (
                    bucket.config.num_replicas or 0,
                    1 + len(bucket.cluster.replicas or []),
                    events.config.num_replicas or 0,
                )
            finally:
                await nc.close()

        assert asyncio.run(copies()) == (3, 3, 3)
        # with randomize off, the node took the first URL given: server 1
        connz = cluster.servers[1].monitor("/connz")
        names = [c.get("name", "") for c in connz["connections"]]
        assert any(name.startswith("sgl-node-") for name in names), names
    finally:
        assert node.stop() == 0
