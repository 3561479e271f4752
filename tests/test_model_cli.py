"""``idlefleet generate --local``: streaming text, --json output, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from idlefleet.node.cli import generate as generate_cli
from idlefleet.node.cli.main import build_parser, main
from idlefleet.node.model import local


@pytest.fixture
def local_model(monkeypatch: pytest.MonkeyPatch, tokenizer: Any, head: Any, whole_model: Any) -> None:
    """Reuse the session's model instead of loading it again for every command."""
    monkeypatch.setattr(local, "load_local", lambda model: (tokenizer, head, whole_model))


@pytest.mark.usefixtures("local_model")
def test_streams_greedy_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--local", "The capital of France is", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == " Paris.\n\nThe\n"


@pytest.mark.usefixtures("local_model")
def test_json_is_the_only_stdout(capsys: pytest.CaptureFixture[str], hf_reference: dict[str, Any]) -> None:
    case = hf_reference["greedy"][0]
    argv = ["generate", "--local", case["prompt"], "--max-new-tokens", "40", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)  # one JSON document, nothing else
    assert set(out) == {"prompt_ids", "new_ids", "text", "tokens_per_s"}
    assert out["prompt_ids"] == case["prompt_ids"]
    assert out["new_ids"] == case["new_ids"]  # stops on EOS like the reference
    assert out["text"] == case["text_skip_special"]
    assert out["tokens_per_s"] > 0


@pytest.mark.usefixtures("local_model")
def test_chat_wraps_prompt_in_template(
    capsys: pytest.CaptureFixture[str], hf_reference: dict[str, Any]
) -> None:
    ex = hf_reference["chat_template_example"]
    argv = ["generate", "--local", ex["messages"][0]["content"], "--chat", "--json"]
    assert main([*argv, "--max-new-tokens", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_ids"] == ex["ids"]


@pytest.mark.usefixtures("local_model")
def test_sampling_with_seed_repeats(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--local", "Once upon a time", "--temperature", "0.9", "--top-p", "0.9"]
    argv += ["--seed", "3", "--max-new-tokens", "8", "--json"]
    runs = []
    for _ in range(2):
        assert main(argv) == 0
        runs.append(json.loads(capsys.readouterr().out)["new_ids"])
    assert runs[0] == runs[1]


def test_local_runner_refuses_bootstrap(capsys: pytest.CaptureFixture[str]) -> None:
    # node.cli sends --bootstrap to the fleet client; run_generate itself only runs locally.
    args = build_parser().parse_args(["generate", "--bootstrap", "/ip4/127.0.0.1/tcp/1", "hi"])
    assert generate_cli.run_generate(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "fleet generation not available yet" in captured.err


def test_fleet_commands_take_a_trust_file() -> None:
    parse = build_parser().parse_args
    assert parse(["generate", "--bootstrap", "/ip4/127.0.0.1/tcp/1", "hi"]).trust_file is None
    for argv in (["generate", "--bootstrap", "/ip4/127.0.0.1/tcp/1", "hi"],
                 ["batch", "--bootstrap", "/ip4/127.0.0.1/tcp/1", "in.jsonl", "--out", "out.jsonl"]):
        assert parse([*argv, "--trust-file", "~/t.json"]).trust_file == Path("~/t.json")


def test_bad_arguments_and_bad_model(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    assert main(["generate", "--local", "hi", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
    (tmp_path / "x.gguf").write_bytes(b"nope")
    assert main(["generate", "--local", "hi", "--model", str(tmp_path / "x.gguf")]) == 1
    assert "not a GGUF file" in capsys.readouterr().err
