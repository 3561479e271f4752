"""``idlefleet generate --bootstrap MULTIADDR PROMPT``: generate across the fleet.

The command joins the fleet as a client-only node (a throwaway identity, no consent, so it serves
nothing), keeps the tokenizer, embedding and LM head locally, and streams text as tokens come.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet.node.cli.run import setup_logging
from idlefleet.node.client.config import ClientConfig, GenerationFailed
from idlefleet.node.client.fleet import FleetClient
from idlefleet.node.config import GEOHASH_ALPHABET, NodeConfig
from idlefleet.node.runtime.node import open_node


def parse_regions(spec: str | None) -> tuple[str, ...]:
    """``"u33,u28"`` -> ``("u33", "u28")``; None -> ``()``. Raises ValueError on a bad prefix."""
    if spec is None:
        return ()
    regions = tuple(r.strip() for r in spec.split(",") if r.strip())
    for r in regions:
        if not (1 <= len(r) <= 12 and set(r) <= GEOHASH_ALPHABET):
            raise ValueError(f"--allow-regions: {r!r} is not a geohash prefix")
    if not regions:
        raise ValueError("--allow-regions needs at least one geohash prefix")
    return regions


async def fleet_generate(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="idlefleet-client-") as tmp:
        config = NodeConfig(key_file=Path(tmp) / "client.key", bootstrap=(args.bootstrap,),
                            consent=False, serve=False, vehicle="sysfs")
        async with open_node(config, key=Ed25519PrivateKey.generate()) as node:
            client = await FleetClient.create(node, args.model, ClientConfig(
                wire_dtype=args.wire_dtype, local_blocks=args.local_blocks,
                allow_regions=parse_regions(args.allow_regions), verify=args.verify,
                verify_window=args.verify_window, verify_min_rate=args.verify_min_rate,
                verify_strict=args.strict, trust_file=args.trust_file))

            def on_token(_token: int, piece: str) -> None:
                if not args.json:
                    sys.stdout.write(piece)
                    sys.stdout.flush()

            result = await client.generate(
                args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, seed=args.seed, chat=args.chat, on_token=on_token)
    if args.json:
        print(json.dumps({
            "prompt_ids": result.prompt_ids, "new_ids": result.new_ids, "text": result.text,
            "tokens_per_s": round(result.tokens_per_s, 3), "route": result.route,
            "failovers": result.failovers, "verification": result.verification,
        }))
    else:
        route = " -> ".join(f"{h['peer_id'][-8:]}[{h['blocks'][0]}:{h['blocks'][1]}]" for h in result.route)
        print(f"\n[{len(result.new_ids)} tokens, {result.tokens_per_s:.1f} tokens/s, route {route}"
              f"{f', {result.failovers} failover(s)' if result.failovers else ''}]", file=sys.stderr)
        v = result.verification
        if v is not None:
            banned = ", ".join(p[-8:] for p in v["banned_peers"])
            print(f"[verified {v['windows_checked']} window(s); {v['unverified_tokens']} token(s) unverified"
                  f"{'; banned ' + banned if banned else ''}]", file=sys.stderr)
            if v["rolled_back_tokens"]:  # the stream above showed tokens that were then discarded
                print(f"[{v['rolled_back_tokens']} token(s) rolled back after a wrong output; the text is:]\n"
                      f"{result.text}", file=sys.stderr)
    return 0


def run_fleet_generate(args: argparse.Namespace) -> int:
    setup_logging("WARNING")
    logging.getLogger("node").setLevel(logging.WARNING)
    try:
        return trio.run(fleet_generate, args)
    except GenerationFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
