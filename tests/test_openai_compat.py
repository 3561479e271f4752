"""OpenAI request validation and stop strings, without I/O."""

from __future__ import annotations

import pytest

from idlefleet.node.api.openai_compat import ApiError, StopScanner, parse_request


def scan(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    scanner = StopScanner(stops)
    out = "".join(scanner.push(p) for p in pieces) + scanner.flush()
    return out, scanner.stopped


@pytest.mark.parametrize(("stops", "pieces", "expected"), [
    ([], ["a", "b"], ("ab", False)),
    (["\n"], [" Paris", ".", "\n", "The"], (" Paris.", True)),
    ([".\n"], [" Paris", ".", "\n\n", "The"], (" Paris", True)),  # split over two pieces
    (["END"], ["the E", "N", "D", "more"], ("the ", True)),
    (["END"], ["the E", "N", "d"], ("the ENd", False)),  # a held-back prefix that was no stop
    (["yz", "z"], ["axyz"], ("ax", True)),  # the earliest match wins
    (["ab"], ["aab"], ("a", True)),
])
def test_stop_scanner_never_shows_a_stop_string(stops: list[str], pieces: list[str],
                                                expected: tuple[str, bool]) -> None:
    assert scan(stops, pieces) == expected


def test_stop_scanner_holds_back_only_possible_prefixes() -> None:
    scanner = StopScanner(["</s>"])
    assert scanner.push("hello <") == "hello "
    assert scanner.push("b>") == "<b>"


def test_parse_request_reads_openai_fields() -> None:
    req = parse_request({"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
        "max_completion_tokens": 5, "temperature": 0, "top_p": 0.5, "seed": -1, "stop": "x",
        "stream": True, "stream_options": {"include_usage": True}, "user": "ignored"}, chat=True)
    assert req.messages[1] == {"role": "user", "content": "hi there"}
    assert (req.max_tokens, req.temperature, req.top_p, req.stop) == (5, 0.0, 0.5, ("x",))
    assert req.seed == 2**64 - 1 and req.stream and req.include_usage
    plain = parse_request({"model": "m", "prompt": ["once"]}, chat=False)
    assert (plain.prompt, plain.temperature, plain.max_tokens) == ("once", 1.0, None)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "m", "prompt": "a", "top_p": 0}, "top_p"),
    ({"model": "m", "prompt": "a", "max_tokens": True}, "max_tokens"),
    ({"model": "m", "prompt": "a", "temperature": float("nan")}, "temperature"),
    ({"model": "m", "prompt": "a", "stream": "yes"}, "stream"),
    ({"model": "m", "prompt": "a", "stop": [""]}, "stop"),
    ({"model": "m", "prompt": "a", "stream_options": []}, "stream_options"),
])
def test_parse_request_names_the_bad_parameter(body: dict[str, object], param: str) -> None:
    with pytest.raises(ApiError) as raised:
        parse_request(body, chat=False)
    assert raised.value.status == 400
    assert raised.value.param == param
