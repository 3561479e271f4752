"""``idlefleet batch``: run a file of prompts, locally or across the fleet, into a results file.

Input: JSON lines ``{"id": ..., "prompt": ...}`` with optional ``max_new_tokens``, ``temperature``
and ``seed``. Output: one JSON line per prompt, ``{"id", "prompt_ids", "new_ids", "text",
"route"?, "error"?}``. Each result is appended and flushed as soon as it is finished, so a crash or
Ctrl-C loses no finished result; rerunning with the same ``--out`` skips every id that already has
a result without ``error`` (failed ids are retried). When a run completes, the output is rewritten
(atomically) in input order with one line per id. A bad input line is reported on stderr with its
line number and counted as failed; the job goes on. A generation the fleet fails (its route lost
and no failover left, the only host of a block banned for a while) is tried up to
``BATCH_ATTEMPTS`` times, each retry after waiting for a route; ``retried`` in the summary counts
them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from idlefleet.node.model import local
from idlefleet.node.model.sampling import SamplingParams

MAX_LINE_TOKENS = 8192  # a per-line max_new_tokens above this is a bad line
# A generation the fleet failed (its route lost, no route for a while) is tried this many times
# in all before its line records the error; each retry first waits for a route.
BATCH_ATTEMPTS = 3

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    line: int  # 1-based line number in the input
    id: str | int
    prompt: str
    params: SamplingParams


@dataclass
class Progress:
    """Counts for the progress bar and the ``--json`` summary."""

    prompts: int
    ok: int = 0
    failed: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    todo: int = 0  # prompts this run has to generate
    retried: int = 0  # generations tried again after the fleet failed them

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def summary(self) -> dict[str, Any]:
        elapsed = self.elapsed_s
        return {"prompts": self.prompts, "ok": self.ok, "failed": self.failed, "tokens": self.tokens,
                "tokens_per_s": round(self.tokens / elapsed, 3) if elapsed > 0 else 0.0,
                "elapsed_s": round(elapsed, 3), "retried": self.retried}


def parse_line(line_no: int, text: str, max_new_tokens: int) -> Prompt:
    """One input line -> :class:`Prompt`; raises ValueError with the reason."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    unknown = set(obj) - {"id", "prompt", "max_new_tokens", "temperature", "seed"}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}")
    ident = obj.get("id")
    if isinstance(ident, bool) or not isinstance(ident, str | int):
        raise ValueError('"id" must be a string or an integer')
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError('"prompt" must be a non-empty string')
    n = obj.get("max_new_tokens", max_new_tokens)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_LINE_TOKENS:
        raise ValueError(f'"max_new_tokens" must be an integer in [0, {MAX_LINE_TOKENS}]')
    temperature = obj.get("temperature", 0.0)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) \
            or not math.isfinite(temperature):
        raise ValueError('"temperature" must be a number')
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError('"seed" must be an integer')
    params = SamplingParams(max_new_tokens=n, temperature=float(temperature), seed=seed)
    return Prompt(line_no, ident, prompt, params)


def read_input(path: Path, max_new_tokens: int, err: TextIO) -> tuple[list[Prompt], int]:
    """Valid prompts of ``path`` in order, and how many lines were bad (each reported on ``err``
    as ``PATH:LINE: reason``). Blank lines are skipped; a repeated id is a bad line."""
    prompts: list[Prompt] = []
    seen: set[str | int] = set()
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                p = parse_line(line_no, text, max_new_tokens)
                if p.id in seen:
                    raise ValueError(f"duplicate id {p.id!r}")
            except ValueError as e:
                bad += 1
                print(f"{path}:{line_no}: skipped: {e}", file=err)
                continue
            seen.add(p.id)
            prompts.append(p)
    return prompts, bad


def read_results(path: Path) -> list[dict[str, Any]]:
    """Result lines already in ``path`` (a torn last line from a crash is ignored)."""
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for text in f:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "id" in obj:
                out.append(obj)
    return out


def compact(path: Path, prompts: list[Prompt]) -> None:
    """Rewrite ``path`` atomically in input order, one line per id (a success beats an error)."""
    best: dict[str | int, dict[str, Any]] = {}
    for obj in read_results(path):
        ident = obj["id"]
        if ident not in best or "error" in best[ident] or "error" not in obj:
            best[ident] = obj
    order = [p.id for p in prompts if p.id in best]
    order += [i for i in best if i not in set(order)]  # ids no longer in the input: keep, at the end
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for ident in order:
            f.write(json.dumps(best[ident]) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ResultWriter:
    """Appends one JSON line per result and flushes it at once; updates the progress."""

    def __init__(self, path: Path, progress: Progress, bar: Callable[[Progress], None]) -> None:
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self.progress = progress
        self.bar = bar

    def write(self, result: dict[str, Any]) -> None:
        self.file.write(json.dumps(result) + "\n")
        self.file.flush()
        if "error" in result:
            self.progress.failed += 1
        else:
            self.progress.ok += 1
            self.progress.tokens += len(result["new_ids"])
        self.bar(self.progress)

    def close(self) -> None:
        self.file.close()


def progress_bar(stream: TextIO) -> Callable[[Progress], None]:
    """A one-line bar (``\\r``-redrawn) on a terminal; nothing otherwise."""
    if not stream.isatty():
        return lambda p: None

    def draw(p: Progress) -> None:
        done = p.ok + p.failed
        total = max(1, p.prompts)
        rate = p.tokens / p.elapsed_s if p.elapsed_s > 0 else 0.0
        finished_now = done - (p.prompts - p.todo)
        left = p.prompts - done
        eta = p.elapsed_s / finished_now * left if finished_now > 0 else float("nan")
        eta_s = "--:--" if math.isnan(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
        width = 24
        fill = round(width * done / total)
        stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{p.prompts} prompts "
                     f"{rate:7.1f} tok/s ETA {eta_s} ")
        stream.flush()

    return draw


def _result(p: Prompt, prompt_ids: list[int], new_ids: list[int], text: str,
            route: list[dict[str, Any]] | None = None, error: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": p.id, "prompt_ids": prompt_ids, "new_ids": new_ids, "text": text}
    if route is not None:
        out["route"] = route
    if error is not None:
        out["error"] = error
    return out


# -- the two engines ---------------------------------------------------------------------------
def run_local(args: argparse.Namespace, todo: list[Prompt], writer: ResultWriter) -> None:
    """Continuous batching in this process (``generate_many``), ``--concurrency`` at a time."""
    from idlefleet.node.model.generate import BatchItem, generate_many

    tokenizer, head, stage = local.load_local(args.model)
    ctx = stage.config.context_length
    items, ids_of = [], {}
    for p in todo:
        ids = _encode(tokenizer, p.prompt, args.chat)
        if not ids or len(ids) + p.params.max_new_tokens > ctx:
            why = "the prompt is empty" if not ids else f"prompt + max_new_tokens exceed the context of {ctx}"
            writer.write(_result(p, ids, [], "", error=why))
            continue
        ids_of[p.line] = (p, ids)
        items.append(BatchItem(p.line, ids, p.params))
    for key, result in generate_many(head, stage, items, tokenizer.stop_ids, args.concurrency):
        p, ids = ids_of[key]  # type: ignore[index]
        writer.write(_result(p, ids, result.new_ids, tokenizer.decode(result.new_ids, skip_special=True)))


async def run_fleet(args: argparse.Namespace) -> int:
    """``--concurrency`` generations at a time across the fleet (their LM head rows batched)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from idlefleet.node.client.config import ClientConfig
    from idlefleet.node.client.fleet import FleetClient
    from idlefleet.node.config import NodeConfig
    from idlefleet.node.runtime.node import open_node

    with tempfile.TemporaryDirectory(prefix="idlefleet-batch-") as tmp:
        config = NodeConfig(key_file=Path(tmp) / "client.key", bootstrap=(args.bootstrap,),
                            consent=False, serve=False, vehicle="sysfs")
        async with open_node(config, key=Ed25519PrivateKey.generate()) as node:
            client = await FleetClient.create(node, args.model, ClientConfig(trust_file=args.trust_file))
            await client.wait_ready()
            return await fleet_job(client, args)


async def run_with_client(client: Any, args: argparse.Namespace, todo: list[Prompt],
                          writer: ResultWriter) -> None:
    """Run ``todo`` on ``client`` (a :class:`FleetClient`), ``args.concurrency`` at a time."""
    import trio

    from idlefleet.node.client.config import GenerationFailed

    send, receive = trio.open_memory_channel[Prompt](0)  # workers pull one prompt at a time

    async def feed() -> None:
        async with send:
            for p in todo:
                await send.send(p)

    async def worker(rx: trio.MemoryReceiveChannel[Prompt]) -> None:
        ctx = client.model.head.config.context_length
        async with rx:
            async for p in rx:
                try:
                    ids = _encode(client.model.tokenizer, p.prompt, args.chat)
                    if len(ids) + p.params.max_new_tokens > ctx:
                        raise ValueError(f"prompt + max_new_tokens exceed the context of {ctx}")
                except ValueError as e:
                    writer.write(_result(p, [], [], "", error=str(e)))
                    continue
                for attempt in range(1, BATCH_ATTEMPTS + 1):
                    try:
                        r = await client.generate(p.prompt, max_new_tokens=p.params.max_new_tokens,
                                                  temperature=p.params.temperature, seed=p.params.seed,
                                                  chat=args.chat)
                    except ValueError as e:  # this prompt cannot be run (not the fleet's fault)
                        writer.write(_result(p, [], [], "", error=str(e)))
                        break
                    except GenerationFailed as e:
                        if attempt == BATCH_ATTEMPTS:
                            writer.write(_result(p, [], [], "", error=str(e)))
                            break
                        # The fleet lost the route (a peer died or was banned, the only host of
                        # a block left): wait until some route covers the model again, bounded
                        # by how long a ban lasts; then the next attempt starts from scratch.
                        log.info("prompt %r, attempt %d: %s; trying again", p.id, attempt, e)
                        writer.progress.retried += 1
                        with contextlib.suppress(GenerationFailed):
                            await client.wait_ready(timeout=client.config.ban_s + client.config.route_wait_s)
                        continue
                    writer.write(_result(p, r.prompt_ids, r.new_ids, r.text, route=r.route))
                    break

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        async with receive:
            for _ in range(max(1, args.concurrency)):
                nursery.start_soon(worker, receive.clone())


def _encode(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    return list(tokenizer.encode(text))


def start_job(args: argparse.Namespace, err: TextIO) -> tuple[list[Prompt], list[Prompt], ResultWriter]:
    """Read the input (bad lines reported on ``err``) and the results so far; return every valid
    prompt, those still to do, and the writer appending to ``args.out``."""
    prompts, bad = read_input(args.input, args.max_new_tokens, err)
    done = {obj["id"] for obj in read_results(args.out) if "error" not in obj}
    todo = [p for p in prompts if p.id not in done]
    progress = Progress(prompts=len(prompts) + bad, ok=len(prompts) - len(todo), failed=bad,
                        todo=len(todo))
    if len(todo) < len(prompts):
        print(f"resuming: {len(prompts) - len(todo)} of {len(prompts)} prompts already done", file=err)
    bar = progress_bar(err) if not args.json else (lambda p: None)
    return prompts, todo, ResultWriter(args.out, progress, bar)


def finish_job(args: argparse.Namespace, prompts: list[Prompt], writer: ResultWriter,
               out: TextIO, err: TextIO) -> int:
    """Order the output, print the summary; 0 if nothing failed (bad lines count), else 1."""
    compact(args.out, prompts)
    s = writer.progress.summary()
    if args.json:
        print(json.dumps(s), file=out)
    else:
        if err.isatty():
            err.write("\n")
        print(f"{s['ok']}/{s['prompts']} ok, {s['failed']} failed, {s['tokens']} tokens in "
              f"{s['elapsed_s']:.1f}s ({s['tokens_per_s']:.1f} tokens/s) -> {args.out}", file=err)
    return 0 if s["failed"] == 0 else 1


async def fleet_job(client: Any, args: argparse.Namespace, out: TextIO = sys.stdout,
                    err: TextIO = sys.stderr) -> int:
    """The whole job on ``client`` (a ready :class:`FleetClient`); returns the exit code.
    Cancelled (Ctrl-C), it stops with every finished result already in ``args.out``."""
    prompts, todo, writer = start_job(args, err)
    try:
        await run_with_client(client, args, todo, writer)
    finally:
        writer.close()
    return finish_job(args, prompts, writer, out, err)


def run_batch(args: argparse.Namespace) -> int:
    """Entry point of the subcommand: 0 if every prompt has a result without error, 1 if some
    failed (bad lines included), 2 for bad usage."""
    from idlefleet.node.cli.run import setup_logging

    if args.concurrency < 1 or args.max_new_tokens < 0:
        print("error: --concurrency must be >= 1 and --max-new-tokens >= 0", file=sys.stderr)
        return 2
    if not args.input.is_file():
        print(f"error: no input file {args.input}", file=sys.stderr)
        return 2
    setup_logging("WARNING")
    if not args.local:
        import trio

        return trio.run(run_fleet, args)
    prompts, todo, writer = start_job(args, sys.stderr)
    try:
        run_local(args, todo, writer)
    finally:
        writer.close()
    return finish_job(args, prompts, writer, sys.stdout, sys.stderr)
