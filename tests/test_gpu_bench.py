"""benchmarks/gpu_bench.sh runs in CI on the CPU with a tiny model (the code paths of the GPU run), so it never
rots: every figure it promises comes out as a RESULT line with numbers."""
import os
import subprocess
import sys


def results(out: str) -> list[dict]:
    return [dict(kv.split("=", 1) for kv in line.split()[1:])
            for line in out.splitlines() if line.startswith("RESULT ")]


def test_gpu_bench_tiny_prints_every_figure():
    out = subprocess.run(["bash", "benchmarks/gpu_bench.sh", "--tiny"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = results(out.stdout)
    steps = [r for r in rows if r["bench"] == "step"]
    assert {r["batch"] for r in steps} == {"packed", "dense"} and all(float(r["tokens_per_s"]) > 0 for r in steps)
    packed = next(r for r in steps if r["batch"] == "packed")
    assert int(packed["samples"]) > 1 and int(packed["tokens"]) <= int(packed["budget"])
    assert float(next(r for r in rows if r["bench"] == "packed_vs_dense")["ratio"]) > 0
    kinds = {r["kind"] for r in rows if r["bench"] == "attention"}
    assert kinds == {"spatial", "temporal", "full", "cross"}
    assert next(r for r in rows if r["bench"] == "setup")["backends"] == "dense,reference"
    assert {r["backend"] for r in steps} == {"auto", "dense", "reference"}
    assert {(r["kind"], r["backend"]) for r in rows if r["bench"] == "attention"} == \
        {(k, b) for k in kinds for b in ("dense", "reference")}
