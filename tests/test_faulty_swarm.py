"""``idlefleet swarm --faulty``: a real faulty node process among honest ones (marked slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from idlefleet.node.cli.procs import pid_alive, tied_popen_kwargs

pytestmark = pytest.mark.slow

IDLEFLEET = [sys.executable, "-m", "idlefleet.node.cli"]
PROMPT = "Once upon a time,"
TOKENS = 6


def test_a_faulty_swarm_node_is_marked_and_really_returns_wrong_outputs(
        tmp_path: Path, local_greedy: Any) -> None:
    state = tmp_path / "state.json"
    env = {k: v for k, v in os.environ.items() if k != "IDLEFLEET_CHAOS"}  # the swarm sets it itself
    # Three nodes of 10 blocks each cover SmolLM2's 30 blocks once: every route passes the faulty one.
    proc = subprocess.Popen([*IDLEFLEET, "swarm", "--nodes", "3", "--faulty", "1:corrupt",
                             "--duration", "300", "--state-file", str(state),
                             "--dir", str(tmp_path / "swarm")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **tied_popen_kwargs(env))
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        nodes = json.loads(state.read_text())["nodes"]
        pids = [n["pid"] for n in nodes]
        assert [n["faulty"] for n in nodes] == [False, False, True]
        assert nodes[2]["fault"] == "corrupt" and "fault" not in nodes[0]
        events = [(Path(n["data_dir"]) / "events.jsonl").read_text() for n in nodes]
        assert '"event": "chaos_fault"' in events[2]
        assert not any('"chaos_fault"' in e for e in events[:2])

        out = subprocess.run([*IDLEFLEET, "generate", "--bootstrap", nodes[0]["multiaddr"], PROMPT,
                              "--max-new-tokens", str(TOKENS), "--json", "--no-verify"],
                             capture_output=True, text=True, timeout=240, **tied_popen_kwargs(env))
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert {h["peer_id"] for h in result["route"]} >= {nodes[2]["peer_id"]}
        status_file = tmp_path / "swarm" / "node2.status.json"
        status = json.loads(status_file.read_text())
        deadline = time.monotonic() + 15  # the node rewrites its status file every few seconds
        while not status.get("faulted") and time.monotonic() < deadline:
            time.sleep(0.2)
            status = json.loads(status_file.read_text())
        assert status["chaos_fault"] == "corrupt"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            printed, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            printed, _ = proc.communicate()
        deadline = time.monotonic() + 30
        while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in pids if pid_alive(pid)]
        for pid in left:  # only if the test failed: never leave our nodes running
            os.kill(pid, signal.SIGKILL)
    assert not left
    assert "FAULTY nodes (test tooling: they return WRONG outputs): #2" in printed
    # Without verification the faulty node's wrong hidden states change the tokens.
    assert status["faulted"] > 0
    assert result["new_ids"] != list(local_greedy(PROMPT, TOKENS))
