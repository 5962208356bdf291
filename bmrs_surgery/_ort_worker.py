"""ONNX Runtime timing worker, run as a script (``python _ort_worker.py MODEL THREADS``).

It imports only onnxruntime and numpy, never torch: timings are taken in a process without
torch's thread pools. It holds one session, first says which inputs the model takes (name,
ONNX type, shape; a symbolic dimension as null), and answers JSON requests on stdin, one per line:
``{"batch": 8, "warmup": 3, "runs": 10, "feeds": [...]}`` -> ``{"times_ms": [...], "peak_rss_mb": ...}``.

Each feed describes one named input: ``{"name", "dtype" (a numpy dtype name), "shape" (the sizes
after the batch axis), "fill"}``; the batch size of the request becomes axis 0 of every input.
``fill`` is ``normal`` (standard normal), ``ones``, ``zeros``, ``positions`` (``0..L-1`` along
the last axis), ``ids`` (uniform integers in ``[0, high)``: token ids within the vocabulary) or
``file`` (the rows of the ``.npy`` array at ``path``, repeated to the batch size). A request
without feeds gets one standard-normal float32 input (the model's first).

It never outlives the process that started it: on Linux the kernel kills it when its parent
dies (``PR_SET_PDEATHSIG``), however the parent ended (SIGKILL included); the parent kills it on
a time-out, an error or a signal (:mod:`bench`).
"""

import json
import os
import resource
import signal
import sys
import time


def _die_with_parent() -> None:
    """Ask the kernel for SIGKILL when the parent exits (Linux); exit now if it already has."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent or parent == 1:  # the parent died before the request took effect
        os._exit(1)


def _rss_mb() -> float:
    """This worker's own peak resident memory, in MiB. On Linux it is ``VmHWM`` of
    /proc/self/status: ``getrusage(RUSAGE_SELF).ru_maxrss`` survives ``execve`` and so starts at
    the high-water mark of the process that started the worker (the parent, torch and all)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def _array(np, rng, feed: dict, batch: int):
    """One input of ``batch`` rows as ``feed`` describes it (see the module docstring)."""
    shape = [batch] + list(feed["shape"])
    dtype = np.dtype(feed["dtype"])
    fill = feed["fill"]
    if fill == "file":
        rows = np.load(feed["path"], allow_pickle=False)
        return np.ascontiguousarray(rows[np.arange(batch) % rows.shape[0]]).astype(dtype, copy=False)
    if fill == "normal":
        return rng.standard_normal(shape).astype(dtype)
    if fill == "ones":
        return np.ones(shape, dtype=dtype)
    if fill == "zeros":
        return np.zeros(shape, dtype=dtype)
    if fill == "positions":
        return np.ascontiguousarray(np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape))
    if fill == "ids":
        return rng.integers(0, max(1, int(feed.get("high", 2))), size=shape).astype(dtype)
    raise ValueError(f"unknown fill {fill!r} for input {feed['name']}")


def main() -> None:
    _die_with_parent()
    path, threads = sys.argv[1], int(sys.argv[2])
    import numpy as np
    import onnxruntime as ort

    base = _rss_mb()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads > 0:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        print(json.dumps({"error": str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}),
              flush=True)
        return
    inp = sess.get_inputs()[0]
    info = {
        "ready": True, "input": inp.name, "input_shape": [d if isinstance(d, int) else None for d in inp.shape],
        "inputs": [{"name": i.name, "type": i.type, "shape": [d if isinstance(d, int) else None for d in i.shape]}
                   for i in sess.get_inputs()],
        "provider": sess.get_providers()[0], "onnxruntime": ort.__version__,
        "threads": threads, "optimization": "ORT_ENABLE_ALL", "base_rss_mb": base,
    }
    print(json.dumps(info), flush=True)
    rng = np.random.default_rng(0)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req.get("feeds"):
                feed = {f["name"]: _array(np, rng, f, req["batch"]) for f in req["feeds"]}
            else:
                shape = [req["batch"]] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
                if req.get("shape"):
                    shape = [req["batch"]] + list(req["shape"][1:])
                feed = {inp.name: rng.standard_normal(shape).astype(np.float32)}
            for _ in range(req.get("warmup", 0)):
                sess.run(None, feed)
            times = []
            for _ in range(req["runs"]):
                t = time.perf_counter()
                sess.run(None, feed)
                times.append((time.perf_counter() - t) * 1000.0)
        except Exception as exc:  # noqa: BLE001
            print(json.dumps({"error": str(exc).strip().splitlines()[0]}), flush=True)
            continue
        print(json.dumps({"times_ms": times, "peak_rss_mb": _rss_mb(), "base_rss_mb": base}), flush=True)


if __name__ == "__main__":
    main()
