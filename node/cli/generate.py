"""``idlefleet generate``: run the model locally and stream the new text to stdout."""

from __future__ import annotations

import argparse
import json
import sys

from idlefleet.node.model import local
from idlefleet.node.model.generate import generate, local_middle
from idlefleet.node.model.sampling import SamplingParams
from idlefleet.node.model.tokenizer import TextStream
from idlefleet.protocols.errors import ModelError, ModelInputError


def run_generate(args: argparse.Namespace) -> int:
    """Entry point of the subcommand; returns the process exit code.

    Text streams to stdout as tokens come (flushed each time); with ``--json`` stdout gets only
    one JSON object at the end. Errors go to stderr: 2 for bad usage, 1 for a bad model.
    """
    if args.bootstrap:
        print("error: fleet generation not available yet (use --local)", file=sys.stderr)
        return 2
    try:
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        tokenizer, head, stage = local.load_local(args.model)
        text = args.prompt
        if args.chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        prompt_ids = tokenizer.encode(text)
        if not prompt_ids:
            print("error: the prompt is empty", file=sys.stderr)
            return 2
        stream = TextStream(tokenizer)

        def on_token(token: int) -> None:
            if not args.json:
                sys.stdout.write(stream.push(token))
                sys.stdout.flush()

        cache = stage.new_cache(capacity=len(prompt_ids) + params.max_new_tokens)
        result = generate(head, local_middle(stage, cache), prompt_ids, params, tokenizer.stop_ids, on_token)
    except (ModelError, ModelInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        out = {
            "prompt_ids": result.prompt_ids,
            "new_ids": result.new_ids,
            "text": tokenizer.decode(result.new_ids, skip_special=True),
            "tokens_per_s": round(result.tokens_per_s, 3),
        }
        print(json.dumps(out))
    else:
        sys.stdout.write(stream.flush() + "\n")
        sys.stdout.flush()
    return 0
