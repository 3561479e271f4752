"""The swarm launcher sees node 0 listen (then starts the others) without connecting to it.

That the others bootstrap off the address it predicts is checked in ``test_swarm.py``."""

from __future__ import annotations

import socket

from idlefleet.node.cli.swarm import _free_port, _listening


def test_a_listening_socket_is_seen_without_connecting() -> None:
    port = _free_port()
    assert _listening(port) is False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        assert _listening(port) is False  # bound, not yet listening
        sock.listen()
        assert _listening(port) is True
    assert _listening(port) is False
