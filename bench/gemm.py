"""What one SmolLM2 block's matrix products cost at batch 1..64 rows, for 1 and 2 BLAS threads.

Batching sessions pays only if ``M`` rows through a weight matrix cost much less than ``M`` times
one row. For each ``OPENBLAS_NUM_THREADS`` in ``--threads`` this script re-runs itself in a child
process (the variable is read when numpy loads BLAS), multiplies ``[M, in]`` activations by each
of block 0's weight matrices (the stage's own layout, as ``blocks.py`` uses them), and prints the
median time per block for each ``M``, its ratio to ``M = 1``, the throughput gain ``M x t(1) /
t(M)``, the GFLOPS reached, and how ``M`` separate one-row products compare. The machine may be
shared: spinning BLAS threads suffer most from that; run it several times.

    python -m bench.gemm                      # threads 1 and 2, M = 1, 2, 4, 8, 16, 64
    python -m bench.gemm --threads 1 --rows 1,8 --repeats 500
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def measure(rows: list[int], repeats: int) -> dict[str, object]:
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from idlefleet.node.model import blocks as B
    from idlefleet.node.model.gguf_loader import open_model
    from idlefleet.node.model.locate import find_default_model
    from idlefleet.node.model.stage import load_stage

    with open_model(find_default_model()) as mf:
        block = load_stage(mf, 0, 1).blocks[0]
    mats = [v for v in vars(block).values() if isinstance(v, np.ndarray) and v.ndim == 2]
    flops_per_row = 2 * sum(m.size for m in mats)
    rng = np.random.default_rng(0)

    def median_ms(f: object) -> float:
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            f()  # type: ignore[operator]
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3

    out: dict[str, object] = {"matrices": [list(m.shape) for m in mats],
                              "weight_mb": round(sum(m.nbytes for m in mats) / 1e6, 1)}
    per_m = {}
    for m_rows in rows:
        xs = [rng.standard_normal((m_rows, w.shape[1])).astype(np.float32) for w in mats]
        # plain: one general product per weight; sliced: blocks.matmul (the engine's path)
        gemm = median_ms(lambda xs=xs: [x @ w.T for x, w in zip(xs, mats, strict=True)])
        sliced = median_ms(lambda xs=xs: [B.matmul(x, w) for x, w in zip(xs, mats, strict=True)])
        rowwise = median_ms(lambda xs=xs: [x[i:i + 1] @ w.T for x, w in zip(xs, mats, strict=True)
                                           for i in range(x.shape[0])])
        per_m[m_rows] = {"ms": round(gemm, 4), "sliced_ms": round(sliced, 4),
                         "rowwise_ms": round(rowwise, 4),
                         "chunks": [B._small_chunk(m_rows, *w.shape) for w in mats],
                         "gflops": round(flops_per_row * m_rows / gemm / 1e6, 1)}
    one = per_m[rows[0]]["ms"] / rows[0] if rows[0] == 1 else None
    for m_rows, r in per_m.items():
        if one is not None:
            r["over_one_row"] = round(r["ms"] / one, 2)
            r["throughput_gain"] = round(m_rows * one / r["ms"], 2)
            r["sliced_gain"] = round(m_rows * one / r["sliced_ms"], 2)
    out["rows"] = per_m
    out["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gemm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="OPENBLAS_NUM_THREADS values (default 1,2)")
    p.add_argument("--rows", default="1,2,4,8,16,64", help="batch sizes M; start with 1 for ratios")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print only the final JSON line")
    args = p.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    if args.child:
        print(json.dumps(measure(rows, args.repeats)))
        return 0
    results = {}
    for threads in args.threads.split(","):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads,
               "MKL_NUM_THREADS": threads}
        proc = subprocess.run([sys.executable, "-m", "bench.gemm", "--child", "--rows", args.rows,
                               "--repeats", str(args.repeats)], env=env, capture_output=True, text=True,
                              timeout=600, check=True, cwd=Path(__file__).resolve().parent.parent)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results[threads] = r
        if not args.json:
            print(f"BLAS threads {threads}: block 0's matrices {r['matrices']} ({r['weight_mb']} MB), "
                  f"load average {r['loadavg']}")
            for m_rows, x in r["rows"].items():
                print(f"  M={int(m_rows):3d}: {x['ms']:8.3f} ms ({x['gflops']:6.1f} GFLOPS), "
                      f"{x.get('over_one_row', '-')}x one row, throughput x{x.get('throughput_gain', '-')}; "
                      f"sliced {x['sliced_ms']:.3f} ms, throughput x{x.get('sliced_gain', '-')} "
                      f"(slices {x['chunks']}); M one-row products {x['rowwise_ms']:.3f} ms")
    print(json.dumps({"bench": "gemm", "threads": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
