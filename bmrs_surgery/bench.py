"""ONNX Runtime benchmarking: latency, throughput, file size and memory, A/B interleaved.

Each model gets its own worker process (:mod:`_ort_worker`, no torch inside) holding one
session; the parent asks them in turn (A, B, A, B, ...) for a few runs at a time, so the two are
measured under the same machine load, and only one session computes at any moment.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BmrsError, first_line

WORKER = Path(__file__).with_name("_ort_worker.py")


class BenchError(BmrsError):
    """A model ONNX Runtime cannot load or run, or inputs that do not agree."""


class _Worker:
    def __init__(self, path: Path, threads: int):
        env = dict(os.environ)
        if threads > 0:
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(path), str(threads)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )
        self.info = self._read(path)

    def _read(self, path) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError(f"{path}: ONNX Runtime worker exited without an answer")
        msg = json.loads(line)
        if "error" in msg:
            raise BenchError(f"{path}: ONNX Runtime cannot run it ({msg['error']})")
        return msg

    def ask(self, path, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read(path)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001
            self.proc.kill()


@dataclass
class Stats:
    batch: int
    times_ms: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    base_rss_mb: float = 0.0

    def to_dict(self) -> dict:
        t = sorted(self.times_ms)
        med = statistics.median(t)
        return {
            "batch": self.batch, "runs": len(t), "median_ms": med, "p90_ms": t[min(len(t) - 1, int(0.9 * len(t)))],
            "min_ms": t[0], "throughput_per_s": self.batch / (med / 1000.0),
            "peak_rss_mb": self.peak_rss_mb,  # the worker process: Python + ONNX Runtime + session
            "session_memory_mb": max(0.0, self.peak_rss_mb - self.base_rss_mb),
        }


def check_onnx(path: Path) -> None:
    """A one-line error unless ``path`` is a readable ONNX model."""
    import onnx

    if not path.is_file():
        raise BenchError(f"{path} does not exist")
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001
        raise BenchError(f"{path} is not a valid ONNX model ({first_line(exc)[:200]})") from None


def benchmark(paths: list[Path], batch_sizes=(1, 8, 32), threads: int = 0, warmup: int = 5, runs: int = 30,
              rounds: int = 5, shape: list[int] | None = None) -> dict:
    """Latency of each ONNX model per batch size, interleaved across models; ratios vs the first."""
    for p in paths:
        check_onnx(p)
    workers: list[_Worker] = []
    try:
        for p in paths:
            workers.append(_Worker(p, threads))
        shapes = [w.info["input_shape"][1:] for w in workers]
        if any(s != shapes[0] for s in shapes[1:]):
            raise BenchError(f"the models take different inputs: {' vs '.join(str(s) for s in shapes)}")
        if shape is None and any(d is None for d in shapes[0]):
            raise BenchError("the model's input has symbolic dimensions besides the batch: give --input-shape")
        stats = {(i, b): Stats(b) for i in range(len(paths)) for b in batch_sizes}
        per_round = max(1, runs // rounds)
        for b in batch_sizes:
            for i, w in enumerate(workers):
                w.ask(paths[i], batch=b, warmup=warmup, runs=0, shape=shape)
            for _ in range(rounds):
                for i, w in enumerate(workers):
                    ans = w.ask(paths[i], batch=b, warmup=0, runs=per_round, shape=shape)
                    s = stats[(i, b)]
                    s.times_ms += ans["times_ms"]
                    s.peak_rss_mb = max(s.peak_rss_mb, ans["peak_rss_mb"])
                    s.base_rss_mb = ans["base_rss_mb"]
        info = workers[0].info
    finally:
        for w in workers:
            w.close()
    models = []
    for i, p in enumerate(paths):
        models.append({"path": str(p), "file_size_bytes": p.stat().st_size,
                       "batches": [stats[(i, b)].to_dict() for b in batch_sizes]})
    result = {
        "session": {"provider": info["provider"], "onnxruntime": info["onnxruntime"],
                    "intra_op_threads": threads or "default (all cores)", "inter_op_threads": 1,
                    "graph_optimization": info["optimization"], "execution_mode": "sequential",
                    "warmup": warmup, "runs": per_round * rounds, "rounds_interleaved": rounds},
        "models": models,
    }
    if len(paths) > 1:
        result["ratios_vs_first"] = [
            {"path": str(paths[j]), "batches": [
                {"batch": b, "median_ratio": models[j]["batches"][k]["median_ms"] / models[0]["batches"][k]["median_ms"],
                 "min_ratio": models[j]["batches"][k]["min_ms"] / models[0]["batches"][k]["min_ms"]}
                for k, b in enumerate(batch_sizes)]}
            for j in range(1, len(paths))
        ]
    return result
