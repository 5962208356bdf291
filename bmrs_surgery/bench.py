"""ONNX Runtime benchmarking: latency, throughput, file size and memory, A/B interleaved.

Each model gets its own worker process (:mod:`_ort_worker`, no torch inside) holding one
session; the parent asks them in turn (A, B, A, B, ...) for a few runs at a time, so the two are
measured under the same machine load, and only one session computes at any moment.

Every answer from a worker (loading the model, one batch size's warm-up, one round of timed runs)
must come within ``timeout`` seconds: a worker past it is killed and the run ends with a
:class:`BenchTimeout` naming the model and the limit (an ONNX ``Loop`` of 2**63 - 1 trips never
answers). Workers end with the parent whatever happens: on any exception, Ctrl-C included, the
parent kills them, and each worker asks the kernel to kill it when its parent dies.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BmrsError, first_line
from .limits import check_threads

WORKER = Path(__file__).with_name("_ort_worker.py")
DEFAULT_TIMEOUT_S = 300.0
"""How long one answer from a worker may take by default (loading, a warm-up, a round of runs)."""


class BenchError(BmrsError):
    """A model ONNX Runtime cannot load or run, or inputs that do not agree."""


class BenchTimeout(BenchError):
    """A worker did not answer within the time limit (it has been killed)."""


class Interrupted(BaseException):
    """SIGTERM (or SIGINT) arrived while benchmarking; ``code`` is the exit status to end with
    (128 + the signal number). A BaseException, like KeyboardInterrupt, so that no ``except
    Exception`` swallows it and every ``finally`` (workers killed, temporary folders removed) runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.code = 128 + signum


@contextmanager
def signals_raise(signums=(signal.SIGTERM, signal.SIGINT)):
    """Within the block the given signals raise :class:`Interrupted` in the main thread, so that
    the ``finally`` blocks below end the workers and ``with TemporaryDirectory`` removes its folder;
    the earlier handlers come back afterwards. Does nothing outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _Worker:
    def __init__(self, path: Path, threads: int, timeout: float | None = DEFAULT_TIMEOUT_S):
        self.path, self.timeout = path, timeout
        env = dict(os.environ)
        if threads > 0:
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(path), str(threads)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", env=env,
        )
        # A thread reads the answers, so that waiting for one can time out (and be interrupted);
        # another drains stderr, keeping its last lines to say why a worker died.
        self._lines: queue.Queue = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=20)
        self._stderr_done = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()
        try:
            self.info = self._read()
        except BaseException:  # not yet in the caller's list of workers: end it here
            self.kill()
            raise

    def _pump(self) -> None:
        try:
            for line in self.proc.stdout:
                self._lines.put(line)
        except (OSError, ValueError):
            pass
        self._lines.put("")

    def _pump_stderr(self) -> None:
        try:
            for line in self.proc.stderr:
                if line.strip():
                    self._stderr.append(line.strip())
        except (OSError, ValueError):
            pass
        self._stderr_done.set()

    def _death(self) -> str:
        """How the worker ended: its exit code or signal, and the last line it wrote to stderr."""
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self._stderr_done.wait(timeout=2)
        if code is None:
            how = "closed its output"
        elif code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        last = self._stderr[-1] if self._stderr else None
        return f"{how}{f' ({last[:200]})' if last else ', nothing on stderr'}"

    def _read(self) -> dict:
        try:
            line = self._lines.get(timeout=self.timeout)
        except queue.Empty:
            self.kill()
            raise BenchTimeout(f"{self.path}: ONNX Runtime did not answer within the {self.timeout:g} s limit "
                               "(--timeout); the worker was stopped") from None
        if not line:
            raise BenchError(f"{self.path}: the ONNX Runtime worker {self._death()} without an answer")
        msg = json.loads(line)
        if "error" in msg:
            raise BenchError(f"{self.path}: ONNX Runtime cannot run it ({msg['error']})")
        return msg

    def ask(self, path=None, **req) -> dict:
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the worker is gone: _read says so
        return self._read()

    def kill(self) -> None:
        """End the worker now (it may be inside a run that never returns)."""
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Let an idle worker end by itself (end of its input); kill it if it does not."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except BaseException:  # noqa: BLE001 - a signal while waiting included: the worker must not outlive us
            self.kill()
            raise


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


def check_timeout(timeout) -> float:
    """A time limit in seconds: a finite number > 0."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise BenchError(f"must be a number of seconds > 0, got {timeout!r}", param="timeout")
    return float(timeout)


ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8",
             "tensor(uint8)": "uint8", "tensor(bool)": "bool"}
"""The ONNX input types bench can feed, as numpy dtype names."""


def onnx_vocab(path: Path) -> dict[str, int]:
    """For each integer graph input that indexes an embedding table (a ``Gather`` of an initializer,
    directly or through a ``Cast``): the table's rows, i.e. the vocabulary its ids must stay below."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - check_onnx has vetted the file; no vocabulary is no error
        return {}
    tables = {t.name: int(t.dims[0]) for t in model.graph.initializer if len(t.dims) >= 1}
    source = {i.name: i.name for i in model.graph.input}  # a tensor name -> the graph input it carries
    for node in model.graph.node:
        if node.op_type in ("Cast", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze") and node.input \
                and node.input[0] in source:
            for o in node.output:
                source[o] = source[node.input[0]]
    vocab: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) >= 2 and node.input[1] in source and node.input[0] in tables:
            name = source[node.input[1]]
            vocab[name] = min(vocab.get(name, tables[node.input[0]]), tables[node.input[0]])
    return vocab


def describe_feed(feed: dict) -> str:
    """``input_ids:int64:Bx12 (ids in [0, 50))``: one input as it is fed at batch size B."""
    how = {"normal": "standard normal", "ones": "all ones", "zeros": "all zeros", "positions": "0..L-1",
           "file": "rows of --inputs-file"}.get(feed["fill"]) or f"ids in [0, {feed.get('high') or 2})"
    return f"{feed['name']}:{feed['dtype']}:{'x'.join(['B'] + [str(d) for d in feed['shape']])} ({how})"


def graph_feeds(info: dict, path: Path, shape: list[int] | None = None) -> list[dict]:
    """Feeds for every graph input of a model when no ``--input`` is given: each input's dtype and
    fixed sizes from the ONNX graph, the batch from the request; ``shape`` (``--input-shape``) gives
    the sizes of a model with one input. A symbolic size besides the batch needs ``--input``."""
    from .inputs import fill_for

    inputs = info.get("inputs") or [{"name": info["input"], "type": "tensor(float)", "shape": info["input_shape"]}]
    if shape is not None and len(inputs) != 1:
        raise BenchError(f"{path}: --input-shape sizes one input, but the model takes {len(inputs)} "
                         f"({', '.join(i['name'] for i in inputs)}): give each with --input NAME:DTYPE:SHAPE")
    feeds = []
    for i in inputs:
        dtype = ORT_TYPES.get(i["type"])
        if dtype is None:
            raise BenchError(f"{path}: input {i['name']} is a {i['type']}, which bench cannot feed")
        dims = list(shape[1:]) if shape is not None else i["shape"][1:]
        if any(d is None for d in dims):
            sizes = "x".join("?" if d is None else str(d) for d in i["shape"])
            if len(inputs) == 1 and dtype.startswith("float"):
                raise BenchError(f"the model's input has symbolic dimensions besides the batch ({sizes}): give "
                                 "--input-shape (or --input NAME:DTYPE:SHAPE)")
            raise BenchError(f"{path}: input {i['name']} has symbolic dimensions besides the batch ({sizes}): give "
                             f"every input's sizes with --input, e.g. --input {i['name']}:{dtype}:1x128")
        feeds.append({"name": i["name"], "dtype": dtype, "shape": dims, "fill": fill_for(i["name"], dtype),
                      "high": None})
    return feeds


def _high(feed: dict, rows: int | None) -> int:
    """Token ids stay below the feed's own ``high`` (the model's vocabulary) and the embedding
    table found in the ONNX graph; below 2 when neither is known."""
    known = [h for h in (feed.get("high"), rows) if h]
    return min(known) if known else 2


def _feeds_for(info: dict, feeds: list[dict], path: Path) -> list[dict]:
    """The feeds one model takes: every graph input must have one, with its dtype and fixed sizes;
    a feed the graph does not take (an exporter drops inputs the model never reads) is left out."""
    given = {f["name"]: f for f in feeds}
    out = []
    for i in info.get("inputs", []):
        f = given.get(i["name"])
        if f is None:
            raise BenchError(f"{path}: the model takes input {i['name']!r}, which the given inputs "
                             f"({', '.join(given)}) do not include")
        want = ORT_TYPES.get(i["type"], i["type"])
        if want != f["dtype"]:
            raise BenchError(f"{path}: input {i['name']} is {want} in the model, not {f['dtype']}")
        dims = i["shape"][1:]
        if len(dims) != len(f["shape"]) or any(d is not None and d != g for d, g in zip(dims, f["shape"])):
            sizes = "x".join("?" if d is None else str(d) for d in i["shape"])
            raise BenchError(f"{path}: input {i['name']} has shape {sizes} in the model, not "
                             f"{'x'.join(['B'] + [str(d) for d in f['shape']])}")
        out.append(f)
    return out


def benchmark(paths: list[Path], batch_sizes=(1, 8, 32), threads: int = 0, warmup: int = 5, runs: int = 30,
              rounds: int = 5, shape: list[int] | None = None, timeout: float = DEFAULT_TIMEOUT_S,
              feeds: list[dict] | None = None) -> dict:
    """Latency of each ONNX model per batch size, interleaved across models; ratios vs the first.

    ``threads``: 0 (ONNX Runtime's default) up to the machine's cores; ``timeout``: seconds each
    answer of a worker may take (a worker past it is killed: :class:`BenchTimeout`).

    Every graph input of a model is fed with its own dtype and sizes, the batch size on axis 0.
    ``feeds`` (see :mod:`_ort_worker`: ``name``, numpy ``dtype``, ``shape`` after the batch,
    ``fill``, ``high``) describe named inputs, e.g. from ``--input``; without them they come from
    the first model's graph inputs (:func:`graph_feeds`; ``shape`` sizes a model with one input).
    Token ids (``fill`` ``ids``) without a ``high`` stay below the vocabulary read from the models'
    embedding tables (:func:`onnx_vocab`), or below 2 when none is found."""
    check_threads(threads)
    timeout = check_timeout(timeout)
    for p in paths:
        check_onnx(p)
    workers: list[_Worker] = []
    ok = False
    try:
        for p in paths:
            workers.append(_Worker(p, threads, timeout))
        if feeds is None:
            sigs = [[(i["type"], i["shape"][1:]) for i in w.info.get("inputs", [])] for w in workers]
            if any(s != sigs[0] for s in sigs[1:]):
                shapes = [[i["shape"][1:] for i in w.info.get("inputs", [])] for w in workers]
                shapes = [s[0] if len(s) == 1 else s for s in shapes]
                raise BenchError(f"the models take different inputs: {' vs '.join(str(s) for s in shapes)}")
            feeds = graph_feeds(workers[0].info, paths[0], shape)
        vocab: dict[str, int] = {}
        for p in paths:
            for name, rows in onnx_vocab(p).items():
                vocab[name] = min(vocab.get(name, rows), rows)
        feeds = [dict(f, high=_high(f, vocab.get(f["name"]))) if f["fill"] == "ids" else f for f in feeds]
        per_model = [_feeds_for(w.info, feeds, paths[i]) for i, w in enumerate(workers)]
        stats = {(i, b): Stats(b) for i in range(len(paths)) for b in batch_sizes}
        per_round = max(1, runs // rounds)
        for b in batch_sizes:
            for i, w in enumerate(workers):
                w.ask(paths[i], batch=b, warmup=warmup, runs=0, feeds=per_model[i])
            for _ in range(rounds):
                for i, w in enumerate(workers):
                    ans = w.ask(paths[i], batch=b, warmup=0, runs=per_round, feeds=per_model[i])
                    s = stats[(i, b)]
                    s.times_ms += ans["times_ms"]
                    s.peak_rss_mb = max(s.peak_rss_mb, ans["peak_rss_mb"])
                    s.base_rss_mb = ans["base_rss_mb"]
        info = workers[0].info
        ok = True
    finally:
        for w in workers:
            if ok:
                w.close()
            else:  # an error, a time-out or a signal: nothing more to ask, end them now
                w.kill()
    models = []
    for i, p in enumerate(paths):
        models.append({"path": str(p), "file_size_bytes": p.stat().st_size,
                       "inputs": [f["name"] for f in per_model[i]],
                       "batches": [stats[(i, b)].to_dict() for b in batch_sizes]})
    result = {
        "session": {"provider": info["provider"], "onnxruntime": info["onnxruntime"],
                    "intra_op_threads": threads or "default (all cores)", "inter_op_threads": 1,
                    "graph_optimization": info["optimization"], "execution_mode": "sequential",
                    "warmup": warmup, "runs": per_round * rounds, "rounds_interleaved": rounds,
                    "inputs": [describe_feed(f) for f in per_model[0]]},
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
