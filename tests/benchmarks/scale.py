"""Scale: 1, 8 and 32 sim nodes on this machine against one NATS server, and against a
3-server cluster (discovery with 3 copies) in the same run — time until all are
registered, discovery exact, aggregate throughput, memory per node.

    python3 supervisor/bootstrap.py exec python -m tests.benchmarks.scale
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
import time
from pathlib import Path

from supervisor.client import NodeClient
from supervisor.nats_cluster import NatsCluster
from tests.benchmarks._common import python, table, write_section
from tests.node.harness import NatsServer, NodeProcess, descendants, start_node

SIZES = (1, 8, 32)
LOAD_SECONDS = 5.0


def _rss_kb(pid: int) -> int:
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


async def _instances(url: str | list[str]) -> set[str]:
    async with NodeClient(url) as client:
        return {r.instance_id for r in await client.instances()}


def run(size: int, tmp: Path, clustered: bool) -> tuple[object, ...]:
    fabric: NatsServer | NatsCluster
    if clustered:
        fabric = NatsCluster(tmp / f"cluster-{size}").start()
        urls, fabric_name = fabric.urls, "3 servers, R3"
    else:
        fabric = NatsServer(tmp, store=f"nats-{size}")
        urls, fabric_name = [fabric.url], "1 server"
    nodes: list[NodeProcess] = []
    try:
        started = time.monotonic()
        for i in range(size):
            nodes.append(
                start_node(
                    tmp,
                    embedded_nats=False,
                    nats_url=urls[i % len(urls)],
                    name=f"n{size}-{i}-{len(urls)}",
                    node={"instance_id": f"scale{size}x{i}"},
                    engine__sim={"decode_time_per_step": 0.0},
                    logging={"level": "warning"},
                    system={"enabled": False},
                    metrics={"interval": 5.0},
                    # each node starts on a server of its own, in turn
                    nats={"url": urls[i % len(urls) :] + urls[: i % len(urls)]},
                    discovery={"replicas": len(urls), "lease_ttl": 10.0, "heartbeat": 1.0},
                )
            )
        expected = {f"scale{size}x{i}" for i in range(size)}
        while True:
            found = asyncio.run(_instances(urls))
            if found >= expected:
                break
            if time.monotonic() - started > 600:
                break
            time.sleep(0.2)
        registered = time.monotonic() - started
        exact = found == expected
        died = sum(1 for n in nodes if n.proc.poll() is not None)
        print(
            f"{size} nodes: {len(found)} registered after {registered:.1f}s, {died} exited",
            flush=True,
        )
        proc = python(
            "-m",
            "tests.benchmarks._load",
            urls[-1],
            "dynamo.backend.generate",
            "32",
            str(LOAD_SECONDS),
            "16",
            stdout=subprocess.PIPE,
        )
        out, _ = proc.communicate(timeout=120)
        result = json.loads(out.decode().strip().splitlines()[-1])
        rps = result["requests"] / result["seconds"]
        cps = result["chunks"] / result["seconds"]
        memory = sum(_rss_kb(n.proc.pid) for n in nodes) / size / 1024
        lost = result["errors"] + result["lost"]
        return fabric_name, size, registered, exact, died, rps, cps, lost, memory
    finally:
        for node in nodes:
            node.kill()
        if isinstance(fabric, NatsCluster):
            fabric.close()
        else:
            fabric.stop()


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows = [run(size, tmp, clustered) for clustered in (False, True) for size in SIZES]
    body = (
        "N node processes (sim engine at zero cost, each with its engine host) on one nats-server, then on a "
        "3-server cluster on this machine (node i starts on server i mod 3, discovery with 3 copies); nodes are started "
        "one after another. *Registered* is the time from the first start until discovery lists all N; *exact* means "
        f"it lists exactly those N. Throughput: 32 concurrent 16-token streams over the queue group for {LOAD_SECONDS:g} s. "
        "*Errors + lost*: streams that ended in an error or went silent for 30 s (must be 0). "
        "Memory: RSS of a node and its engine host, averaged over the nodes. One run per size, with no "
        "baseline beside it: absolute figures from this machine.\n\n"
        + table(
            [
                "fabric",
                "nodes",
                "all registered after s",
                "discovery exact",
                "nodes exited",
                "requests/s",
                "chunks/s",
                "errors + lost",
                "MiB per node",
            ],
            rows,
        )
    )
    write_section("scale", "Scale (sim nodes on one NATS server and on a 3-server cluster)", body)


if __name__ == "__main__":
    main()
