"""Hostile inputs, end to end (project issue 15, item 11): the probe suite.

Builds hostile files and options in a temporary folder and runs the real console script
(``python -m cli.main ...``, ``cwd`` = the case's folder, ``PYTHONPATH`` = the repository root)
once per case, with a hard timeout. For every case it records: the command, the exit code,
whether stderr is exactly one line starting ``Error:``, a traceback, a hang (timeout), what was
written into ``--out``, whether any input file changed (SHA-256 before and after), the command's
own peak memory (GNU ``time``'s ``%M``; ``os.wait4`` rusage without it), what was expected and whether it held.

    python benchmarks/hostile_inputs.py                 # all cases, writes the results
    python benchmarks/hostile_inputs.py --only npz      # cases whose name contains 'npz'

Results: benchmarks/results/hostile_inputs/cpu.json and cpu.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import pickle
import platform
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "hostile_inputs"
CASE_TIMEOUT = 60.0
FAST = ["--data", "digits", "--epochs", "1", "--finetune-epochs", "0", "-q", "--bench-batch-sizes", ""]
MARKER = "CODE_RAN_MARKER"
TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None  # GNU time: the command's own peak  # a file that appears only if code from a hostile file ran

try:
    sys.path.insert(0, str(REPO))
    from bmrs_surgery.loading import CHECKPOINT_FORMAT
except Exception:  # pragma: no cover - the probe still runs against a broken tree
    CHECKPOINT_FORMAT = "bmrs-surgery/checkpoint/3"


# ------------------------------------------------------------------------------------------------
# Running one command
# ------------------------------------------------------------------------------------------------

@dataclass
class Run:
    argv: list[str]
    rc: int | None
    stdout: str
    stderr: str
    hang: bool
    seconds: float
    peak_mib: float


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["COLUMNS"] = "200"
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class Child:
    """A console-script run in its own session (with GNU time around it when present), reaped with os.wait4."""

    def __init__(self, args: list[str], cwd: Path, tag: str):
        self.argv = [sys.executable, "-m", "cli.main", *[str(a) for a in args]]
        self._out = open(cwd / f".probe-{tag}.stdout", "w+b")
        self._err = open(cwd / f".probe-{tag}.stderr", "w+b")
        # ru_maxrss survives execve: a child spawned from this (torch-importing) process starts at
        # our own high-water mark. GNU time forks the command from its own small process, so its
        # %M is the command's own peak; it also reports a death by a signal as such.
        self._time = cwd / f".probe-{tag}.time"
        launcher = [TIME, "-f", "%M", "-o", str(self._time)] if TIME else []
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(launcher + self.argv, cwd=cwd, env=_env(), stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=self._err, start_new_session=True)
        self.rc: int | None = None
        self.peak_kib = 0

    def _target(self) -> int:
        """The command's pid (under GNU time, its only child)."""
        if not TIME:
            return self.proc.pid
        for _ in range(50):
            try:
                kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except OSError:
                kids = []
            if kids:
                return int(kids[0])
            time.sleep(0.02)
        return self.proc.pid

    def _reaped(self, status: int, usage) -> None:
        self.rc = os.waitstatus_to_exitcode(status)
        self.peak_kib = usage.ru_maxrss
        if TIME and self._time.is_file():
            lines = self._time.read_text().split("\n")
            self._time.unlink()
            for line in lines:
                if line.startswith("Command terminated by signal "):
                    self.rc = -int(line.split()[-1])
                elif line.startswith("Command exited with non-zero status "):
                    self.rc = int(line.split()[-1])
                elif line.strip().isdigit():
                    self.peak_kib = int(line)
        self.proc.returncode = self.rc

    def poll(self) -> int | None:
        if self.rc is None:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self._reaped(status, usage)
        return self.rc

    def signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self._target(), sig)

    def finish(self, timeout: float = CASE_TIMEOUT) -> Run:
        hang = False
        while self.poll() is None:
            if time.monotonic() - self.t0 > timeout:
                hang = True
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _, status, usage = os.wait4(self.proc.pid, 0)
                self._reaped(status, usage)
                break
            time.sleep(0.05)
        try:  # leftovers of its session (ONNX Runtime workers) never outlive the case
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        seconds = time.monotonic() - self.t0
        texts = []
        for f in (self._out, self._err):
            f.seek(0)
            texts.append(f.read().decode("utf-8", "replace"))
            f.close()
            Path(f.name).unlink(missing_ok=True)
        return Run(self.argv, self.rc, texts[0], texts[1], hang, seconds, self.peak_kib / 1024)


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------

@dataclass
class Expect:
    rc: tuple[int, ...] = (2,)
    one_line: bool = True  # stderr exactly one line starting "Error:"
    any_line: bool = False  # stderr exactly one line, any text (an interrupt is not a mistake)
    at_most_one_line: bool = False  # stderr empty or one line (a signal before the command started)
    signal_death: tuple[int, ...] = ()  # deaths by these signals count as exit 128 + N (what a shell shows)
    out: str = "nothing"  # nothing | resume-only | outputs | unchanged | any
    stdout_has: tuple[str, ...] = ()
    stdout_lacks: tuple[str, ...] = ()
    text: str = ""

    def describe(self) -> str:
        if self.text:
            return self.text
        parts = []
        if self.one_line:
            parts.append("one line")
        if self.any_line:
            parts.append("one stderr line")
        if self.at_most_one_line:
            parts.append("at most one stderr line")
        if self.signal_death:
            parts.append("no traceback; a death by " + " or ".join(signal.Signals(s).name for s in self.signal_death)
                         + " counts as exit 128 + N")
        parts.append("exit " + "/".join(map(str, self.rc)))
        parts.append({"nothing": "nothing written", "resume-only": "only the resume state in --out",
                      "outputs": "outputs written", "unchanged": "--out unchanged", "any": ""}[self.out])
        return ", ".join(p for p in parts if p)


@dataclass
class Case:
    group: str
    name: str
    build: Callable[[Path], dict]  # returns {"args": [...], "inputs": [...], "out": Path|None, ...}
    expect: Expect = field(default_factory=Expect)


def crafted_checkpoint(path: Path, arch, *, num_classes=None, input_shape=(1, 32, 32), **extra) -> Path:
    ck = {"format": CHECKPOINT_FORMAT, "arch": arch, "num_classes": num_classes,
          "input_shape": list(input_shape) if input_shape else None, "groups": [], "traced": False,
          "noise": None, "state_dict": {}}
    ck.update(extra)
    torch.save(ck, path)
    return path


class CodeRunner:
    """Unpickling this writes the marker file: proof that a file chose code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code from a file ran')",))


def _ck_case(arch, **kw):
    def build(d: Path) -> dict:
        ck = crafted_checkpoint(d / "gated.pt", arch, **kw)
        return {"args": [ck.name, *FAST, "--out", "run"], "inputs": [ck], "out": d / "run"}
    return build


def _damaged_groups(d: Path) -> dict:
    from models import get_model

    ck = crafted_checkpoint(d / "gated.pt", "lenet5", num_classes=10,
                            state_dict=get_model("lenet5").state_dict(),
                            groups=[{"members": "garbage", "size": -5}, 42, None])
    return {"args": [ck.name, *FAST, "--out", "run"], "inputs": [ck], "out": d / "run"}


def _pickle_in_torch(d: Path) -> dict:
    p = d / "whole.pt"
    torch.save({"model": CodeRunner(str(d / MARKER))}, p)
    return {"args": [p.name, *FAST, "--out", "run"], "inputs": [p], "out": d / "run"}


def _raw_pickle(d: Path) -> dict:
    p = d / "raw.pt"
    p.write_bytes(pickle.dumps(CodeRunner(str(d / MARKER))))
    return {"args": [p.name, *FAST, "--out", "run"], "inputs": [p], "out": d / "run"}


def _pickle_inspect(d: Path) -> dict:
    p = d / "whole.pth"
    torch.save(CodeRunner(str(d / MARKER)), p)
    return {"args": ["inspect", p.name], "inputs": [p], "out": None}


def _pickle_as_arch_state(d: Path) -> dict:
    p = d / "weights.pt"
    torch.save({"conv1.weight": CodeRunner(str(d / MARKER))}, p)
    return {"args": [p.name, "--arch", "lenet5", *FAST, "--out", "run"], "inputs": [p], "out": d / "run"}


def _safetensors_header(length: int):
    def build(d: Path) -> dict:
        p = d / "weights.safetensors"
        p.write_bytes(struct.pack("<Q", length) + b'{"a":' + b"\0" * 32)
        return {"args": [p.name, "--arch", "lenet5", *FAST, "--out", "run"], "inputs": [p], "out": d / "run"}
    return build


def _safetensors_huge_tensor(d: Path) -> dict:
    header = json.dumps({"conv1.weight": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 16]}}).encode()
    p = d / "weights.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    return {"args": [p.name, "--arch", "lenet5", *FAST, "--out", "run"], "inputs": [p], "out": d / "run"}


def _digits_like(n=64):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 1, 32, 32)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)


def _npz(make: Callable[[Path], Path]):
    def build(d: Path) -> dict:
        p = make(d)
        return {"args": ["lenet5", "--data", p.name, "--epochs", "1", "--finetune-epochs", "0", "-q",
                         "--bench-batch-sizes", "", "--out", "run"], "inputs": [p], "out": d / "run"}
    return build


def _npz_object(d: Path) -> Path:
    x, y = _digits_like()
    obj = np.empty(2, dtype=object)
    obj[0], obj[1] = CodeRunner(str(d / MARKER)), 1
    np.savez(d / "object.npz", x=obj, y=y)
    return d / "object.npz"


def _npz_declared(shape, name):
    def make(d: Path) -> Path:
        p = d / name
        _, y = _digits_like()
        with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as z:
            with z.open("x.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(
                    f, {"descr": "<f4", "fortran_order": False, "shape": shape})
            with z.open("y.npy", "w") as f:
                np.lib.format.write_array(f, np.zeros(shape[0] if shape[0] < 10**7 else 64, dtype=np.int64))
        return p
    return make


def _npz_bomb_real(d: Path) -> Path:
    """A 2 GiB float32 array of zeros compressed into a small file (real data, not just a header)."""
    p = d / "bomb.npz"
    n = 2 * 1024**3 // (4 * 1024)
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, 1, 32, 32)})
            chunk = bytes(64 * 1024**2)
            for _ in range(2 * 1024**3 // len(chunk)):
                f.write(chunk)
        with z.open("y.npy", "w") as f:
            np.lib.format.write_array(f, np.zeros(n, dtype=np.int64))
    return p


def _npz_values(kind):
    def make(d: Path) -> Path:
        x, y = _digits_like()
        if kind == "nan":
            x[3, 0, 4, 4] = np.nan
        elif kind == "inf":
            x[5, 0, 1, 1] = np.inf
        elif kind == "neg":
            y[7] = -1
        elif kind == "huge":
            y[7] = 10**12
        elif kind == "float-labels":
            y = y.astype(np.float64) + 0.5
        p = d / f"{kind}.npz"
        np.savez(p, x=x, y=y)
        return p
    return make


def _csv_as_npz(d: Path) -> Path:
    p = d / "table.npz"
    p.write_text("x,y\n1,2\n3,4\n")
    return p


def _npy_as_npz(d: Path) -> Path:
    p = d / "array.npz"
    with open(p, "wb") as f:
        np.save(f, _digits_like()[0])
    return p


def _onnx_garbage(d: Path) -> dict:
    p = d / "junk.onnx"
    p.write_bytes(os.urandom(4096))
    return {"args": ["bench", p.name, "--batch-sizes", "1", "--runs", "1", "--warmup", "0"], "inputs": [p], "out": None}


def _onnx_loop(d: Path) -> dict:
    import onnx
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["x_in", "one"], ["x_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, ["N", 1, 32, 32])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["N", 1, 32, 32])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)],
        "forever",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 32, 32])],
        [helper.make_tensor("trips", TensorProto.INT64, [], [2**63 - 1]),
         helper.make_tensor("cond", TensorProto.BOOL, [], [True])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    p = d / "loop.onnx"
    onnx.save(model, p)
    return {"args": ["bench", p.name, "--batch-sizes", "1", "--runs", "1", "--warmup", "0", "--timeout", "5"],
            "inputs": [p], "out": None}


def _opts(*args, out=True):
    def build(d: Path) -> dict:
        a = list(args) + (["--out", "run"] if out else [])
        return {"args": a, "inputs": [], "out": d / "run" if out else None}
    return build


def _hostile_names(d: Path) -> dict:
    names = ["[link=http://evil-example]a[/link]", "[/x]b", "c\x1b[31mred\x1b]0;title\x07", "[bold red]loud[/]"]
    layers, width = [("flat", torch.nn.Flatten())], 1024
    for i, name in enumerate(names):
        layers += [(name, torch.nn.Linear(width, 8)), (f"act{i}", torch.nn.ReLU())]
        width = 8
    layers.append(("out", torch.nn.Linear(width, 10)))
    p = d / "hostile.pt"
    torch.save(torch.nn.Sequential(OrderedDict(layers)), p)
    return {"args": [p.name, "--trust-model", *FAST, "--out", "run"], "inputs": [p], "out": d / "run"}


def _hostile_names_inspect(d: Path) -> dict:
    spec = _hostile_names(d)
    return {"args": ["inspect", "hostile.pt", "--trust-model", "--input-shape", "1,1,32,32"],
            "inputs": spec["inputs"], "out": None}


def _out_holds_model(d: Path) -> dict:
    from models import get_model

    p = d / "gated.pt"
    torch.save(get_model("lenet5"), p)
    return {"args": [p.name, "--trust-model", *FAST, "--out", ".", "--overwrite"], "inputs": [p], "out": d,
            "out_is_input_folder": True}


def _earlier_results(d: Path) -> dict:
    out = d / "run"
    out.mkdir()
    (out / "report.json").write_text('{"earlier": true}')
    (out / "pruned.pt").write_bytes(b"earlier model")
    return {"args": ["lenet5", *FAST, "--out", "run"], "inputs": [out / "report.json", out / "pruned.pt"], "out": out}


# Cases that need more than one child: they run themselves and return (Run, extra notes).

LONG_FIT = ["lenet5", "--data", "digits", "--epochs", "200", "--finetune-epochs", "0", "-q",
            "--bench-batch-sizes", "", "--out", "run"]


def _wait_for(pred: Callable[[], bool], child: Child, limit: float) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if pred():
            return True
        if child.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def _interrupt(sig: int, after_first_epoch: bool, delay: float = 3.0):
    def run(d: Path) -> tuple[dict, Run, list[str]]:
        out = d / "run"
        child = Child(LONG_FIT, d, "a")
        notes = []
        if after_first_epoch:
            seen = _wait_for(lambda: any(out.glob(".bmrs-resume-*.pt")), child, 45)
            notes.append("first epoch saved" if seen else "no resume state seen before signalling")
        time.sleep(delay)
        child.signal(sig)
        notes.append(f"{signal.Signals(sig).name} sent {time.monotonic() - child.t0:.1f} s after start")
        return {"args": LONG_FIT, "inputs": [], "out": out}, child.finish(), notes
    return run


def _two_jobs(d: Path) -> tuple[dict, Run, list[str]]:
    out = d / "run"
    first = Child(LONG_FIT, d, "a")
    locked = _wait_for(lambda: (out / ".bmrs-lock").exists(), first, 45)
    second = Child(["lenet5", *FAST, "--out", "run"], d, "b").finish()
    still = first.poll() is None
    first.signal(signal.SIGTERM)
    first_run = first.finish()
    notes = [f"first job {'held the lock' if locked else 'never took the lock'}, "
             f"{'still running' if still else 'had ended'} after the second; first exit {first_run.rc}"]
    return {"args": ["lenet5", *FAST, "--out", "run"], "inputs": [], "out": out, "second_of_two": True}, second, notes


def cases() -> list[Case]:
    one = Expect()
    c = [
        # crafted checkpoints
        Case("checkpoint", "arch os:abort", _ck_case("os:abort")),
        Case("checkpoint", "arch sys:exit", _ck_case("sys:exit")),
        Case("checkpoint", "arch http.server:test", _ck_case("http.server:test")),
        Case("checkpoint", "arch signal:pause", _ck_case("signal:pause")),
        Case("checkpoint", "torchvision:resnet18 num_classes 10**9", _ck_case("torchvision:resnet18", num_classes=10**9)),
        Case("checkpoint", "lenet5 input_shape 3x100000x100000", _ck_case("lenet5", input_shape=(3, 100_000, 100_000))),
        Case("checkpoint", "damaged groups list", _damaged_groups),
        Case("checkpoint", "arch is a list", _ck_case(["os", "system"])),
        # pickles without --trust-model
        Case("pickle", "torch.save'd object with __reduce__", _pickle_in_torch),
        Case("pickle", "raw pickle (legacy format) .pt", _raw_pickle),
        Case("pickle", "inspect a pickled object .pth", _pickle_inspect),
        Case("pickle", "state dict holding a __reduce__ object, --arch", _pickle_as_arch_state),
        # safetensors
        Case("safetensors", "header length 2**63", _safetensors_header(2**63)),
        Case("safetensors", "header length 10**12", _safetensors_header(10**12)),
        Case("safetensors", "tensor shape 2**40 x 2**20 in 16 bytes", _safetensors_huge_tensor),
        # npz data
        Case("npz", "object array holding a __reduce__ object", _npz(_npz_object)),
        Case("npz", "header declares 2 GiB, no data", _npz(_npz_declared((524288, 1, 32, 32), "declared2g.npz"))),
        Case("npz", "header declares 256 MiB, no data (under the limit)",
             _npz(_npz_declared((65536, 1, 32, 32), "declared256m.npz"))),
        Case("npz", "header declares 1 TiB, no data", _npz(_npz_declared((2**28, 1, 32, 32), "declared1t.npz"))),
        Case("npz", "zip bomb: 2 GiB of zeros in a small file", _npz(_npz_bomb_real)),
        Case("npz", "NaN in x", _npz(_npz_values("nan"))),
        Case("npz", "inf in x", _npz(_npz_values("inf"))),
        Case("npz", "negative label", _npz(_npz_values("neg"))),
        Case("npz", "label 10**12", _npz(_npz_values("huge"))),
        Case("npz", "float labels", _npz(_npz_values("float-labels"))),
        Case("npz", "CSV renamed .npz", _npz(_csv_as_npz)),
        Case("npz", ".npy renamed .npz", _npz(_npy_as_npz)),
        # onnx
        Case("onnx", "bench on garbage bytes", _onnx_garbage),
        Case("onnx", "bench on a Loop of INT64-max trips, --timeout 5", _onnx_loop),
        # absurd numbers and shapes
        Case("numbers", "--seed -1", _opts("lenet5", *FAST, "--seed", "-1")),
        Case("numbers", "--seed 2**70", _opts("lenet5", *FAST, "--seed", str(2**70))),
        Case("numbers", "--lr nan", _opts("lenet5", *FAST, "--lr", "nan")),
        Case("numbers", "--gate-lr inf", _opts("lenet5", *FAST, "--gate-lr", "inf")),
        Case("numbers", "--threads 100000", _opts("lenet5", *FAST, "--threads", "100000")),
        Case("numbers", "--batch-size 2**63", _opts("lenet5", *FAST, "--batch-size", str(2**63)),
             Expect(rc=(0, 2), one_line=False, out="any",
                    text="exit 0 (one batch holds the whole set) or one line, exit 2; no traceback")),
        Case("numbers", "--bench-batch-sizes 100000000",
             _opts("lenet5", *FAST[:-2], "--bench-batch-sizes", "100000000")),
        Case("numbers", "inspect --input-shape 1,3,100000,100000",
             _opts("inspect", "torchvision:resnet18", "--input-shape", "1,3,100000,100000", out=False)),
        Case("numbers", "check --ratio nan", _opts("check", "lenet5", "--ratio", "nan", out=False)),
        Case("numbers", "check --seed 2**70", _opts("check", "lenet5", "--seed", str(2**70), out=False)),
        Case("numbers", "bench --batch-sizes 100000000",
             _opts("bench", "lenet5", "--batch-sizes", "100000000", "--runs", "1", "--warmup", "0", out=False)),
        Case("numbers", "bench --threads 100000",
             _opts("bench", "lenet5", "--batch-sizes", "1", "--runs", "1", "--warmup", "0", "--threads", "100000",
                   out=False)),
        # interrupts
        Case("interrupt", "SIGINT 3 s after the first epoch", _interrupt(signal.SIGINT, True),
             Expect(rc=(130,), one_line=False, any_line=True, out="resume-only")),
        Case("interrupt", "SIGTERM 3 s after the first epoch", _interrupt(signal.SIGTERM, True),
             Expect(rc=(130, 143), one_line=False, any_line=True, out="resume-only")),
        Case("interrupt", "SIGINT 3 s after start (startup: imports, loading)", _interrupt(signal.SIGINT, False),
             Expect(rc=(130,), one_line=False, at_most_one_line=True, out="resume-only",
                    signal_death=(signal.SIGINT,))),
        Case("interrupt", "SIGTERM 3 s after start (startup: imports, loading)", _interrupt(signal.SIGTERM, False),
             Expect(rc=(130, 143), one_line=False, at_most_one_line=True, out="resume-only",
                    signal_death=(signal.SIGTERM, signal.SIGINT))),
        # --out
        Case("interrupt", "SIGINT 1.5 s after start (while importing)", _interrupt(signal.SIGINT, False, 1.5),
             Expect(rc=(130,), one_line=False, at_most_one_line=True, out="resume-only",
                    signal_death=(signal.SIGINT,))),
        Case("out", "two jobs into one --out at once (the second)", _two_jobs),
        Case("out", "--out holding the input model (--overwrite)", _out_holds_model, Expect(out="unchanged")),
        Case("out", "--out holding earlier results, no --overwrite", _earlier_results, Expect(out="unchanged")),
        # names
        Case("names", "layer names with rich markup and escapes (compress)", _hostile_names,
             Expect(rc=(0,), one_line=False, out="outputs",
                    stdout_has=("[/x]b", "[link=http://evil-example]a[/link]", "c\\x1b[31mred"),
                    stdout_lacks=("\x1b", "\x07"),
                    text="exit 0, names shown as text (no raw ESC/BEL on stdout), outputs written")),
        Case("names", "layer names with rich markup and escapes (inspect)", _hostile_names_inspect,
             Expect(rc=(0,), one_line=False, out="any",
                    stdout_has=("[/x]b", "[link=http://evil-example]a[/link]", "c\\x1b[31mred"),
                    stdout_lacks=("\x1b", "\x07"), text="exit 0, names shown as text (no raw ESC/BEL)")),
    ]
    del one
    return c


# ------------------------------------------------------------------------------------------------
# Judging
# ------------------------------------------------------------------------------------------------

def _hash(paths) -> dict[str, str]:
    res = {}
    for p in paths:
        p = Path(p)
        res[p.name] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "missing"
    return res


def _listing(folder: Path | None) -> list[str] | None:
    if folder is None or not folder.exists():
        return None
    if folder.is_file():
        return ["<a file>"]
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.name.startswith(".probe-"))


def _non_finite_case(case: Case) -> bool:
    n = case.name.lower()
    return any(k in n for k in ("nan", "inf"))


def run_case(case: Case, root: Path, index: int) -> dict:
    d = root / f"case{index:02d}"
    d.mkdir()
    notes: list[str] = []
    try:
        built = case.build(d)
    except Exception as exc:  # noqa: BLE001 - a case that cannot be built is reported, not fatal
        return {"group": case.group, "case": case.name, "command": "", "expected": case.expect.describe(),
                "held": False, "verdict": f"could not build: {type(exc).__name__}: {exc}"}
    if isinstance(built, tuple):  # a case that runs itself; build() returned (spec, run, notes)
        spec, run, notes = built
        inputs = spec["inputs"]
        before_in, before_out = {}, None
    else:
        spec = built
        inputs = spec["inputs"]
        before_in = _hash(inputs)
        out = spec.get("out")
        before_out = _listing(out) if spec.get("out_is_input_folder") else None
        run = Child(spec["args"], d, "main").finish()
    out = spec.get("out")
    after_in = _hash(inputs)
    if isinstance(built, tuple):
        before_in = after_in
    modified = sorted(k for k in before_in if before_in[k] != after_in.get(k))
    listing = _listing(out)
    if spec.get("out_is_input_folder") and listing is not None:
        listing = [x for x in listing if x not in (before_out or [])]
    marker = (d / MARKER).exists() or (REPO / MARKER).exists()
    err_lines = run.stderr.strip().splitlines()
    one_line = len(err_lines) == 1 and err_lines[0].startswith("Error:")
    traceback = "Traceback (most recent call last)" in run.stderr or "Traceback (most recent call last)" in run.stdout
    e = case.expect
    rc = run.rc
    if rc is not None and rc < 0 and -rc in e.signal_death:
        rc = 128 - rc  # what a shell reports for a death by the signal
        notes.append(f"ended by {signal.Signals(-run.rc).name} itself (a shell shows exit {rc})")
    crashed = rc is not None and rc < 0 and not run.hang
    problems = []
    if run.hang:
        problems.append(f"hang (killed after {CASE_TIMEOUT:.0f} s)")
    if traceback:
        problems.append("traceback")
    if crashed:
        problems.append(f"killed by signal {-run.rc}")
    if rc not in e.rc and not run.hang:
        problems.append(f"exit {run.rc}")
    if (e.one_line or run.rc == 2) and not one_line:
        problems.append(f"stderr not one Error: line ({len(err_lines)} lines)")
    if e.any_line and len(err_lines) != 1:
        problems.append(f"stderr not one line ({len(err_lines)} lines)")
    if e.at_most_one_line and len(err_lines) > 1:
        problems.append(f"stderr {len(err_lines)} lines")
    if modified:
        problems.append("input modified: " + ", ".join(modified))
    if marker:
        problems.append("code from a file ran (marker written)")
    if e.out == "nothing" and listing:
        problems.append(f"written into --out: {listing[:5]}")
    if e.out == "unchanged" and (modified or (listing and not spec.get("out_is_input_folder")
                                              and sorted(listing) != sorted(p.name for p in inputs))):
        problems.append(f"--out changed: {listing}")
    if e.out == "unchanged" and spec.get("out_is_input_folder") and listing:
        problems.append(f"written beside the input: {listing[:5]}")
    if e.out == "resume-only" and listing and any(not x.startswith(".bmrs-resume-") for x in listing):
        problems.append(f"--out holds more than the resume state: {listing[:5]}")
    if e.out == "outputs" and not (listing and "report.json" in listing):
        problems.append("no outputs written")
    for s in e.stdout_has:
        if s not in run.stdout:
            problems.append(f"stdout lacks {s!r}")
    for s in e.stdout_lacks:
        if s in run.stdout:
            problems.append(f"stdout shows raw {s!r}")
    nonfinite_passed = _non_finite_case(case) and run.rc == 0
    if nonfinite_passed:
        problems.append("non-finite value passed")
    return {
        "group": case.group, "case": case.name,
        "command": "bmrs-compress " + " ".join(_shown(a) for a in spec["args"]),
        "exit": run.rc, "one_line": one_line, "traceback": traceback, "hang": run.hang,
        "written_to_out": listing, "input_modified": bool(modified), "code_ran": marker,
        "nonfinite_passed": nonfinite_passed, "peak_mib": round(run.peak_mib, 1), "seconds": round(run.seconds, 1),
        "stderr_tail": "\n".join(err_lines[-3:])[-600:], "notes": notes,
        "expected": e.describe(), "held": not problems, "verdict": "held" if not problems else "; ".join(problems),
    }


def _shown(a) -> str:
    s = str(a)
    r = repr(s)[1:-1] if not s.isprintable() else s
    return r if r and " " not in r else f"'{r}'"


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def totals(rows: list[dict]) -> dict:
    return {
        "cases": len(rows),
        "held": sum(r["held"] for r in rows),
        "did_not_hold": sum(not r["held"] for r in rows),
        "tracebacks": sum(bool(r.get("traceback")) for r in rows),
        "hangs": sum(bool(r.get("hang")) for r in rows),
        "inputs_or_earlier_results_lost": sum(bool(r.get("input_modified")) for r in rows),
        "code_run_from_a_file": sum(bool(r.get("code_ran")) for r in rows),
        "non_finite_values_passing": sum(bool(r.get("nonfinite_passed")) for r in rows),
    }


def _md_cell(v) -> str:
    s = "" if v is None else str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def write_md(path: Path, doc: dict) -> None:
    t = doc["totals"]
    lines = [
        "# Hostile inputs: the probe suite (issue 15, item 11)", "",
        f"Command: `{doc['command']}`  ",
        f"Date: {doc['date']}  ",
        f"Machine: {doc['machine']}; each case a fresh `python -m cli.main` with a {CASE_TIMEOUT:.0f} s timeout, "
        f"whole probe {doc['seconds']:.0f} s", "",
        "## Totals", "",
        f"- cases: {t['cases']}, held: {t['held']}, did not hold: {t['did_not_hold']}",
        f"- tracebacks: {t['tracebacks']}",
        f"- hangs: {t['hangs']}",
        f"- inputs or earlier results lost: {t['inputs_or_earlier_results_lost']}",
        f"- code run from a file: {t['code_run_from_a_file']}",
        f"- non-finite values passing: {t['non_finite_values_passing']}", "",
        "Columns: *one line*: stderr is exactly one line starting `Error:`; *out*: what the case left in "
        "`--out` (`-`: no folder); *peak*: the command's own peak resident memory (MiB, GNU time's `%M`).", "",
        "| group | case | command | exit | one line | traceback | hang | out | input modified | peak MiB | "
        "expected | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["cases"]:
        out = "-" if r.get("written_to_out") is None else (", ".join(r["written_to_out"][:4]) or "(empty)")
        if r.get("written_to_out") and len(r["written_to_out"]) > 4:
            out += f", ... ({len(r['written_to_out'])})"
        verdict = "held" if r["held"] else "**NOT HELD**: " + r["verdict"]
        lines.append("| " + " | ".join(_md_cell(v) for v in [
            r["group"], r["case"], f"`{r['command']}`" if r.get("command") else "", r.get("exit"),
            "yes" if r.get("one_line") else "no", "yes" if r.get("traceback") else "no",
            "yes" if r.get("hang") else "no", out, "yes" if r.get("input_modified") else "no",
            r.get("peak_mib"), r["expected"], verdict]) + " |")
    lines += ["", "## stderr of each case (last line)", ""]
    for r in doc["cases"]:
        tail = (r.get("stderr_tail") or "").splitlines()
        note = ("; " + "; ".join(r["notes"])) if r.get("notes") else ""
        lines.append(f"- {_md_cell(r['case'])}: `{_md_cell(tail[-1] if tail else '(none)')}`{_md_cell(note)}")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run only cases whose group or name contains this")
    ap.add_argument("--no-write", action="store_true", help="print the table, write no result files")
    args = ap.parse_args(argv)
    selected = [c for c in cases() if args.only.lower() in (c.group + " " + c.name).lower()]
    t0 = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bmrs-hostile-") as tmp:
        for i, case in enumerate(selected):
            row = run_case(case, Path(tmp), i)
            rows.append(row)
            mark = "ok  " if row["held"] else "FAIL"
            print(f"{mark} [{row['group']}] {row['case']}: exit {row.get('exit')}, {row.get('seconds')} s, "
                  f"{row.get('peak_mib')} MiB: {row['verdict']}", flush=True)
            tail = (row.get("stderr_tail") or "").splitlines()
            print("     stderr: " + (tail[-1][:300] if tail else "(none)"), flush=True)
    doc = {
        "command": "python benchmarks/hostile_inputs.py" + (f" --only {args.only}" if args.only else ""),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"torch {torch.__version__}",
        "seconds": time.monotonic() - t0, "case_timeout_s": CASE_TIMEOUT,
        "totals": totals(rows), "cases": rows,
    }
    print(json.dumps(doc["totals"]))
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "cpu.json").write_text(json.dumps(doc, indent=1) + "\n")
        write_md(RESULTS / "cpu.md", doc)
        print(f"wrote {RESULTS / 'cpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
