"""One KvRelayActor (with its NATS link) in its own process, fed by a ZMQ endpoint.

python -m tests.benchmarks._relay_host ENDPOINT NATS_URL SUBJECT
"""

from __future__ import annotations

import sys
import time

from actors.fabric import FabricActor
from actors.kv_relay import KvRelayActor
from messages.engine import EngineInfo
from supervisor.core import ActorStart, ChildSpec, Root, SupervisorFlags
from supervisor.logs import configure_logging
from supervisor.plan import FabricSettings, RelaySettings
from tests.node.test_kv_relay import EngineInfoOnly


def main(endpoint: str, url: str, subject: str) -> None:
    configure_logging("warning", "json")
    info = EngineInfo(
        backend="bench",
        model_name="m",
        context_length=1024,
        page_size=16,
        total_kv_blocks=10,
        max_batch_size=4,
        dp_size=1,
        kv_event_endpoints=[endpoint],
        kv_event_topic="kv-events",
        metrics_endpoints=[],
    )
    root = Root(
        "bench",
        SupervisorFlags(),
        [
            ChildSpec(
                "fabric",
                ActorStart(
                    FabricActor,
                    (
                        FabricSettings(
                            servers=[url], client_name="bench-relay", pending_size=64 << 20
                        ),
                    ),
                ),
            ),
            ChildSpec("engine", ActorStart(EngineInfoOnly, (info,))),
            ChildSpec(
                "relay",
                ActorStart(
                    KvRelayActor,
                    (
                        RelaySettings(
                            fabric="bench/fabric",
                            engine_actor="bench/engine",
                            instance_id="bench-1",
                            dp_rank=0,
                            subject=subject,
                        ),
                    ),
                ),
            ),
        ],
    )
    assert root.wait_ready(10)
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(*sys.argv[1:4])
