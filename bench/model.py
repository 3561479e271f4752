"""Benchmark of the numpy forward pass on the default model (SmolLM2-135M).

Prints prefill time for 128 tokens, decode tokens/s of the whole model, per-block times, and the
decode time against a lower bound measured in the same run: the same matrix multiplications on
the same weights in the same order, with nothing else. Peak RSS of the whole model and of a
10-block stage are measured in separate child processes. Times are medians over ``--runs``.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/model.py [--runs 7] [--model PATH]
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads BLAS: one thread, as a node runs

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from idlefleet.node.model import blocks as B  # noqa: E402
from idlefleet.node.model.gguf_loader import open_model  # noqa: E402
from idlefleet.node.model.locate import find_default_model  # noqa: E402
from idlefleet.node.model.stage import Head, Stage, load_head, load_stage  # noqa: E402

PREFILL_TOKENS = 128
DECODE_TOKENS = 32


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def bench_prefill(head: Head, stage: Stage, runs: int) -> tuple[float, float]:
    """Blocks on a 128-token prompt: (forward, its matmuls alone) ms, interleaved."""
    cfg = stage.config
    rng = np.random.default_rng(0)
    x = head.embed(rng.integers(100, cfg.vocab_size, PREFILL_TOKENS))
    a = rng.standard_normal((PREFILL_TOKENS, cfg.n_heads * cfg.head_dim), dtype=np.float32)
    f = rng.standard_normal((PREFILL_TOKENS, cfg.ffn_size), dtype=np.float32)
    times, mms = [], []
    for _ in range(runs):
        cache = stage.new_cache(capacity=PREFILL_TOKENS)
        t0 = time.perf_counter()
        stage.forward(x, cache)
        t1 = time.perf_counter()
        for w in stage.blocks:
            _ = B.matmul(x, w.wqkv)
            _ = B.matmul(a, w.wo)
            _ = B.matmul(x, w.w_gate_up)
            _ = B.matmul(f, w.w_down)
        times.append(t1 - t0)
        mms.append(time.perf_counter() - t1)
    return _median_ms(times), _median_ms(mms)


def bench_decode(head: Head, stage: Stage, runs: int) -> tuple[float, float]:
    """Median ms per generated token: (whole step incl. embed + head + sampling, blocks only)."""
    prompt = head.embed([504, 3575, 282, 4649, 314])
    steps, blocks = [], []
    for _ in range(runs):
        cache = stage.new_cache(capacity=8)  # grows by doubling during the run, as in real use
        h = stage.forward(prompt, cache)
        for _ in range(DECODE_TOKENS):
            t0 = time.perf_counter()
            token = int(np.argmax(head.logits(h[-1:])[0]))
            x = head.embed([token])
            t1 = time.perf_counter()
            h = stage.forward(x, cache)
            t2 = time.perf_counter()
            steps.append(t2 - t0)
            blocks.append(t2 - t1)
    return _median_ms(steps), _median_ms(blocks)


def bench_matmul_bound(head: Head, stage: Stage, runs: int) -> tuple[float, float]:
    """The decode step's matmuls alone, same weights and order: (whole step, blocks only) ms."""
    cfg = stage.config
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, cfg.hidden_size), dtype=np.float32)
    a = rng.standard_normal((1, cfg.n_heads * cfg.head_dim), dtype=np.float32)
    f = rng.standard_normal((1, cfg.ffn_size), dtype=np.float32)
    steps, blocks = [], []
    for _ in range(runs * DECODE_TOKENS):
        t0 = time.perf_counter()
        _ = B.matmul(x, head.lm_head)
        t1 = time.perf_counter()
        for w in stage.blocks:
            _ = B.matmul(x, w.wqkv)
            _ = B.matmul(a, w.wo)
            _ = B.matmul(x, w.w_gate_up)
            _ = B.matmul(f, w.w_down)
        t2 = time.perf_counter()
        steps.append(t2 - t0)
        blocks.append(t2 - t1)
    return _median_ms(steps), _median_ms(blocks)


def bench_hot_block(stage: Stage, runs: int) -> tuple[float, float]:
    """One block over and over (weights stay in cache): (decode step, its matmuls alone) ms.

    This isolates the Python/numpy overhead per block from memory bandwidth.
    """
    cfg = stage.config
    one = Stage(stage.model_id, cfg, 0, stage.blocks[:1])
    w = one.blocks[0]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, cfg.hidden_size), dtype=np.float32)
    a = rng.standard_normal((1, cfg.n_heads * cfg.head_dim), dtype=np.float32)
    f = rng.standard_normal((1, cfg.ffn_size), dtype=np.float32)
    cache = one.new_cache(capacity=64)
    one.forward(np.repeat(x, 32, axis=0), cache)
    steps, mms = [], []
    for _ in range(runs * 100):  # interleaved, so both see the same machine load
        t0 = time.perf_counter()
        one.forward(x, cache, position=32)
        t1 = time.perf_counter()
        _ = B.matmul(x, w.wqkv)
        _ = B.matmul(a, w.wo)
        _ = B.matmul(x, w.w_gate_up)
        _ = B.matmul(f, w.w_down)
        t2 = time.perf_counter()
        steps.append(t1 - t0)
        mms.append(t2 - t1)
    return _median_ms(steps), _median_ms(mms)


def peak_rss_child(model: str, what: str) -> None:
    """In a fresh process: load ``what`` ("whole" or "stage10"), run one step, print peak RSS."""
    mf = open_model(model)
    if what == "whole":
        head, stage = load_head(mf), load_stage(mf, 0, mf.config.n_blocks)
        x = head.embed([1, 2, 3])
    else:
        head, stage = None, load_stage(mf, 0, 10)
        x = np.zeros((3, mf.config.hidden_size), np.float32)
    mf.close()
    h = stage.forward(x, stage.new_cache())
    if head is not None:
        head.logits(h)
    weights = stage.nbytes + (head.nbytes if head is not None else 0)
    print(json.dumps({"peak_mb": _peak_rss_kib() / 1024, "weights_mb": weights / 2**20}))


def _peak_rss_kib() -> int:
    """This process's high-water RSS. (ru_maxrss would include the parent's RSS at fork.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_rss(model: str, what: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--model", model, "--rss-child", what],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2 from the wheel)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--rss-child", choices=["whole", "stage10"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = str(args.model or find_default_model())
    if args.rss_child:
        peak_rss_child(model, args.rss_child)
        return

    with open_model(model) as mf:
        head, stage = load_head(mf), load_stage(mf, 0, mf.config.n_blocks)
    n = len(stage.blocks)
    print(f"model {Path(model).name}: {n} blocks, hidden {stage.config.hidden_size}")
    print(f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}, medians of {args.runs} runs")

    prefill, prefill_mm = bench_prefill(head, stage, args.runs)
    step, blocks = bench_decode(head, stage, args.runs)
    bound_step, bound_blocks = bench_matmul_bound(head, stage, args.runs)
    hot, hot_mm = bench_hot_block(stage, args.runs)
    print(
        f"prefill {PREFILL_TOKENS} tokens: {prefill:8.1f} ms  ({prefill / n:.2f} ms/block;"
        f" matmuls alone {prefill_mm:.1f} ms -> {prefill / prefill_mm:.2f}x)"
    )
    print(f"decode, whole model:    {step:8.2f} ms/token  ({1e3 / step:.1f} tokens/s)")
    print(f"decode, blocks only:    {blocks:8.2f} ms/token  ({blocks / n:.3f} ms/block)")
    print(f"matmul bound, whole:    {bound_step:8.2f} ms/token  -> decode/bound = {step / bound_step:.2f}x")
    print(
        f"matmul bound, blocks:   {bound_blocks:8.2f} ms/token  ({bound_blocks / n:.3f} ms/block)"
        f" -> decode/bound = {blocks / bound_blocks:.2f}x"
    )
    print(
        f"one block, hot in cache: {hot * 1e3:7.1f} us/step vs matmuls {hot_mm * 1e3:.1f} us"
        f" -> {hot / hot_mm:.2f}x (Python/numpy overhead)"
    )

    whole, part = measure_rss(model, "whole"), measure_rss(model, "stage10")
    print(f"peak RSS whole model:   {whole['peak_mb']:8.1f} MiB (weights {whole['weights_mb']:.1f} MiB)")
    print(f"peak RSS 10-block stage:{part['peak_mb']:8.1f} MiB (weights {part['weights_mb']:.1f} MiB)")
    print(f"10-block stage / whole: {part['peak_mb'] / whole['peak_mb']:.0%} of peak RSS")


if __name__ == "__main__":
    main()
