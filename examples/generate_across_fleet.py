"""Generate text across a fleet from your own program (the embedding API).

    python examples/generate_across_fleet.py /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW... "Once upon a time,"

The prompt and the generated tokens stay in this process: only hidden states travel to the peers.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet import FleetClient, NodeConfig, open_node


async def main(bootstrap: str, prompt: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # No consent: this process only asks for work, it serves none.
        config = NodeConfig(key_file=Path(tmp) / "app.key", bootstrap=(bootstrap,), vehicle="sysfs")
        async with open_node(config, key=Ed25519PrivateKey.generate()) as node:
            client = await FleetClient.create(node)
            print(prompt, end="", flush=True)
            generation = client.stream(prompt, max_new_tokens=48)
            async for _token_id, piece in generation:
                print(piece, end="", flush=True)
            assert generation.result is not None
            route = " -> ".join(f"{h['peer_id'][-8:]}{h['blocks']}" for h in generation.result.route)
            print(f"\n[{generation.result.tokens_per_s:.1f} tokens/s via {route}]")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    trio.run(main, sys.argv[1], sys.argv[2])
