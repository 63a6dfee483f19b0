"""The cluster test fabric: three real nats-servers with JetStream, routed on loopback.

It forms (every server routed to the others, one JetStream meta leader), a replicated
bucket outlives the SIGKILL of its leader's server, a partition cuts a server's routes
and healing restores them, and closing it leaves no process and no directory behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from supervisor.nats_cluster import NatsCluster
from tests.supervision.children import pid_alive, wait_until


@pytest.fixture
def cluster() -> Iterator[NatsCluster]:
    with NatsCluster(partitionable=True) as fabric:
        yield fabric


def test_the_cluster_forms_and_carries_messages_between_servers(cluster: NatsCluster) -> None:
    assert cluster.formed() == ""
    leaders = {s.monitor("/jsz")["meta_cluster"]["leader"] for s in cluster.servers}
    assert len(leaders) == 1
    assert leaders <= {s.name for s in cluster.servers}

    async def across() -> bytes:
        sub_nc = await nats.connect(cluster.urls[0], dont_randomize=True)
        pub_nc = await nats.connect(cluster.urls[2], dont_randomize=True)
        try:
            sub = await sub_nc.subscribe("fabric.hello")
            await sub_nc.flush()
            # interest travels over the routes: publish until it has reached server 2
            for _ in range(100):
                await pub_nc.publish("fabric.hello", b"from server 2")
                try:
                    return (await sub.next_msg(timeout=0.1)).data
                except nats.errors.TimeoutError:
                    continue
            return b""
        finally:
            await sub_nc.close()
            await pub_nc.close()

    assert asyncio.run(across()) == b"from server 2"


async def _stream_leader(urls: list[str], stream: str) -> str:
    nc = await nats.connect(urls)
    try:
        info = await nc.jetstream().stream_info(stream)
        assert info.cluster is not None
        return str(info.cluster.leader)
    finally:
        await nc.close()


# Until a replicated stream has a leader (a new bucket's first, or after its leader's
# server died) requests to it time out or find no responder (nats-py says so with either
# of two errors).
_ELECTING = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.APIError,
)


async def _put_once_elected(nc: Any, bucket: str, key: str, value: bytes) -> Any:
    """Put `key` in `bucket`, retrying while its stream elects a leader; the bucket."""
    for _ in range(60):
        try:
            kv = await nc.jetstream().key_value(bucket)
            await kv.put(key, value)
            return kv
        except _ELECTING:
            await asyncio.sleep(0.5)
    kv = await nc.jetstream().key_value(bucket)
    await kv.put(key, value)  # the last try: its error is the test's
    return kv


def test_a_replicated_bucket_survives_the_kill_of_its_leaders_server(
    cluster: NatsCluster,
) -> None:
    async def write() -> list[int]:
        nc = await nats.connect(cluster.urls)
        try:
            await nc.jetstream().create_key_value(bucket="survivor", replicas=3)
            await _put_once_elected(nc, "survivor", "a", b"1")
            info = await nc.jetstream().stream_info("KV_survivor")
            return [len(info.cluster.replicas or []) if info.cluster else 0]
        finally:
            await nc.close()

    assert asyncio.run(write()) == [2]  # the leader and two followers
    leader = asyncio.run(_stream_leader(cluster.urls, "KV_survivor"))
    victim = next(s for s in cluster.servers if s.name == leader)
    cluster.kill(victim.index)
    others = [s.url for s in cluster.servers if s is not victim]

    async def read_and_write_after() -> tuple[bytes, bytes]:
        nc = await nats.connect(others)
        try:
            kv = await _put_once_elected(nc, "survivor", "b", b"2")  # a new leader, first
            a, b = await kv.get("a"), await kv.get("b")
            return a.value or b"", b.value or b""
        finally:
            await nc.close()

    assert asyncio.run(read_and_write_after()) == (b"1", b"2")
    assert asyncio.run(_stream_leader(others, "KV_survivor")) != leader
    cluster.start_server(victim.index)
    cluster.wait_formed(30)


def test_a_partition_cuts_a_servers_routes_until_it_heals(cluster: NatsCluster) -> None:
    cluster.partition(1)
    isolated = cluster.servers[1]
    assert wait_until(lambda: not isolated.monitor("/routez")["routes"], timeout=15)
    assert cluster.formed() != ""
    # the others stay routed to each other
    rest = {r["remote_name"] for r in cluster.servers[0].monitor("/routez")["routes"]}
    assert rest == {cluster.servers[2].name}
    cluster.heal(1)
    cluster.wait_formed(30)
    assert cluster.formed() == ""


def test_closing_the_cluster_leaves_no_process_and_no_directory(tmp_path: Path) -> None:
    fabric = NatsCluster(partitionable=True).start()
    pids, workdir = fabric.pids(), fabric.workdir
    assert len(pids) == 3
    assert workdir.is_dir()
    fabric.close()
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=10)
    assert not workdir.exists()
    # a given work directory is the caller's: its servers stop, the directory stays
    kept = tmp_path / "kept"
    fabric = NatsCluster(kept).start()
    pids = fabric.pids()
    fabric.close()
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=10)
    assert kept.is_dir()
