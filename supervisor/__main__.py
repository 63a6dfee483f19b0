"""`python -m supervisor CONFIG`: run one sgl-node (or its demonstration tree).

Exit codes: 0 after an ordered stop (SIGTERM/SIGINT); 1 when the tree gave up
(restart intensity exceeded) or failed to start; 2 for a bad configuration;
128+N when a second signal N forced a brutal stop.
"""

from __future__ import annotations

import argparse
import signal
import sys

import structlog

from supervisor import stop_signals
from supervisor.child_output import log_child_line
from supervisor.config import ConfigError, NodeConfig, load
from supervisor.core import (
    Root,
    SupervisionMetrics,
    exit_code_for,
    kill_all_process_groups,
    set_output_handler,
)
from supervisor.logs import configure_logging
from supervisor.tomlout import dumps

__all__ = ["build", "main", "serve"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m supervisor",
        description=(
            "Run one sgl-node: an SGLang engine (or the sim engine) as a supervised member "
            "of a NATS serving fabric. See README.md for every configuration key."
        ),
        epilog="exit codes: 0 ordered stop, 1 tree gave up or failed to start, "
        "2 bad configuration, 128+N brutal stop after a second signal N",
    )
    parser.add_argument("config", help="TOML configuration file (e.g. configs/cluster.toml)")
    parser.add_argument(
        "--check", action="store_true", help="validate CONFIG, print the resolved config, exit"
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["auto", "json", "console"])
    return parser


def build(config: NodeConfig) -> Root:
    """Plan, prepare and start the tree the configuration describes (config -> plan ->
    tree -> run). Raises ConfigError when what the plan needs cannot be prepared."""
    if config.node.tree == "demo":
        from supervisor.demo import build_demo_tree

        flags, children = build_demo_tree(config)
        return Root("demo", flags, children)
    from actors.telemetry import node_metrics
    from supervisor.plan import ROOT_NAME, plan_node, prepare
    from supervisor.tree import FRONTEND_ROOT, build_frontend_tree, build_node_tree

    plan = plan_node(config)
    swept = prepare(config, plan)
    log = structlog.get_logger().bind(path="main")
    if swept:
        log.info("removed run directories of dead node processes", count=len(swept))
    if config.node.tree == "frontend":
        log.info("starting frontend", routing=config.frontend.routing, port=config.frontend.port)
        flags, children = build_frontend_tree(config, plan)
        return Root(FRONTEND_ROOT, flags, children)
    log.info(
        "starting node",
        instance_id=plan.instance_id,
        backend=config.engine.backend,
        nats=plan.nats_servers,
        generate_subject=plan.subjects.generate,
    )
    flags, children = build_node_tree(config, plan)
    node_metrics.RESTART_INTENSITY.set(config.supervision.intensity)
    node_metrics.RESTART_PERIOD.set(config.supervision.period)
    root = Root(ROOT_NAME, flags, children)
    SupervisionMetrics(root.bus, node_metrics.REGISTRY, prefix="sgl_node")
    return root


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    stop_signals.catch()  # if `python -m supervisor` has not already, at its first import
    args = _parser().parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"sgl-node: configuration error in {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"# {args.config}: valid; every key resolved (defaults filled in)")
        print(dumps(config))
        return 0
    configure_logging(
        args.log_level or config.logging.level, args.log_format or config.logging.format
    )
    if stop_signals.received:  # a stop signal during start-up, before anything started
        name = signal.Signals(stop_signals.received[0]).name
        structlog.get_logger().bind(path="main").info("stopped before starting", signal=name)
        return 0
    # Children's lines become events of their own (a child's JSON merged, not quoted).
    set_output_handler(log_child_line)
    try:
        root = build(config)
    except ConfigError as exc:
        print(f"sgl-node: configuration error in {args.config}: {exc}", file=sys.stderr)
        return 2
    return serve(root)


def serve(root: Root) -> int:
    """Run `root` until it ends; return the exit code.

    The first SIGTERM/SIGINT stops the tree in order; a second one stops it brutally.
    """
    log = structlog.get_logger().bind(path="main")
    # The handler only records the signal (it may have done so since start-up: see
    # stop_signals); the loop below acts. A second signal cannot wait for that loop: it
    # kills everything and exits at once.
    stop_signals.on_second(kill_all_process_groups)
    # A signal wakes the poll below at once; the timeout only bounds the wait when the
    # kernel hands the signal to another thread (the handler then runs once this thread
    # runs Python again). An idle node's main thread so wakes once a second, not ten times.
    stop_signals.on_signal(root.wake)
    received = stop_signals.catch()
    announced = stopping = False
    while root.exit_reason is None:
        if stopping or not received:  # (a signal from before on_signal: act at once)
            root.poll(1.0)
        if received and not stopping:
            stopping = True
            name = signal.Signals(received[0]).name
            log.info("stopping in order", signal=name)
            root.stop(reason=f"signal {name}")
        if root.ready and not announced:
            announced = True
            log.info("tree ready", root=root.name)
    reason = root.exit_reason
    kill_all_process_groups()  # nothing the node started outlives it
    code = exit_code_for(reason)
    if code:
        print(f"sgl-node: {root.name} stopped: {reason.describe()}", file=sys.stderr)
    else:
        log.info("stopped", reason=reason.describe())
    return code


if __name__ == "__main__":
    sys.exit(main())
