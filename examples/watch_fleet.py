"""Join a fleet as an observer and print its live capacity records every few seconds.

    python examples/watch_fleet.py /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW...

(Start a fleet first, e.g. `idlefleet swarm --nodes 3 --state-file swarm.json` and take the
bootstrap multiaddr from swarm.json.)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from idlefleet import NodeConfig, open_node


async def main(bootstrap: str, rounds: int = 5) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = NodeConfig(key_file=Path(tmp) / "observer.key", bootstrap=(bootstrap,), vehicle="sysfs")
        async with open_node(config, key=Ed25519PrivateKey.generate()) as node:
            await node.wait_for_peers(1, timeout=30)
            for _ in range(rounds):
                for r in node.fleet():
                    if r.peer_id == node.peer_id:
                        continue
                    blocks = f"{r.blocks[0]}-{r.blocks[1]}" if r.blocks else "-"
                    print(f"{r.peer_id[-10:]}  {r.state:<9} battery {r.battery_soc:6.1%}  "
                          f"plugged {r.plugged_in!s:<5}  consent {r.consent!s:<5}  blocks {blocks}")
                print()
                await trio.sleep(3)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    trio.run(main, sys.argv[1])
