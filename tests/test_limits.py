"""Issue 15, items 6-8: hangs, tracebacks and resource exhaustion from small inputs.

``bench`` workers have a time limit and end with bench on every signal; ``--threads`` is capped
at the machine's cores; seeds are checked where they reach torch, numpy and scikit-learn; an
``--input-shape``, a state dict's declared shapes and an ``.npz``'s headers are checked against
memory limits before anything large is allocated (:mod:`bmrs_surgery.limits`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bmrs_surgery import limits
from bmrs_surgery.data import load_data
from bmrs_surgery.errors import BmrsError, DataError, JobError, ModelLoadError
from test_cli import assert_one_line_error, invoke

REPO = Path(__file__).resolve().parents[1]
INT64_MAX = 2**63 - 1


def _cli() -> list[str]:
    exe = shutil.which("bmrs-compress")
    return [exe] if exe else [sys.executable, "-c", "from cli.main import main; main()"]


def _loop_model(path: Path) -> Path:
    """An ONNX model that never finishes: a Loop of INT64_MAX trips whose body passes its value on."""
    import onnx
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)],
    )
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["M"], value=helper.make_tensor("m", TensorProto.INT64, [], [INT64_MAX])),
         helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c0", TensorProto.BOOL, [], [True])),
         helper.make_node("Loop", ["M", "c", "x"], ["y"], body=body)],
        "endless", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _processes_with(text: str) -> list[int]:
    """Ids of live processes whose command line contains ``text`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((ln for ln in (entry / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if text in cmdline and "Z" not in state.split(":", 1)[-1][:3]:  # zombies have ended
            found.append(int(entry.name))
    return found


def _workers(model: Path) -> list[int]:
    """The ONNX Runtime workers benchmarking ``model``."""
    return [pid for pid in _processes_with(str(model)) if pid in _processes_with("_ort_worker")]


def _env(tmp: Path) -> dict:
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(REPO)}


# ------------------------------------------------------------------------------------------------
# item 6: hangs
# ------------------------------------------------------------------------------------------------


pytestmark_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
# The subprocess runs are in the slow tier (python -m pytest -m 'not slow' leaves them out); the
# in-process tests check the same refusals quickly.


@pytest.mark.slow
@pytestmark_linux
def test_bench_endless_loop_model_stops_at_the_timeout(tmp_path):
    model = _loop_model(tmp_path / "endless.onnx")
    start = time.monotonic()
    proc = subprocess.run(_cli() + ["bench", str(model), "--batch-sizes", "1", "--warmup", "1", "--runs", "1",
                                    "--timeout", "2"],
                          capture_output=True, text=True, timeout=300, env=_env(tmp_path / "tmp"), cwd=REPO)
    elapsed = time.monotonic() - start
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "endless.onnx" in lines[0] and "2 s" in lines[0] and "--timeout" in lines[0]
    assert elapsed < 120
    assert not _workers(model), "the timed-out worker survived"
    assert not list((tmp_path / "tmp").glob("bmrs-bench-*"))


def test_bench_timeout_is_in_help_with_its_default():
    out = " ".join(invoke("bench", "--help").stdout.split())
    assert "--timeout" in out and "300" in out
    assert "machine's cores" in out


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_bench_bad_timeout_is_one_line(value, tmp_path):
    model = _loop_model(tmp_path / "m.onnx")
    assert_one_line_error(invoke("bench", str(model), "--timeout", value), "--timeout")


@pytest.mark.slow
@pytestmark_linux
def test_bench_threads_above_the_cores_are_refused_at_once(tmp_path):
    model = _loop_model(tmp_path / "m.onnx")
    proc = subprocess.run(_cli() + ["bench", str(model), "--threads", "100000"], capture_output=True, text=True,
                          timeout=120, env=_env(tmp_path / "tmp"), cwd=REPO)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "--threads" in lines[0] and str(os.cpu_count()) in lines[0]
    assert not _workers(model)


def test_bench_threads_above_the_cores_in_process(tmp_path):
    model = _loop_model(tmp_path / "m.onnx")
    assert_one_line_error(invoke("bench", str(model), "--threads", str(os.cpu_count() + 1)), "--threads")


def test_check_threads():
    assert limits.check_threads(0) == 0 and limits.check_threads(os.cpu_count()) == os.cpu_count()
    for bad in (-1, os.cpu_count() + 1, 100000, True, 1.5):
        with pytest.raises(JobError) as exc:
            limits.check_threads(bad)
        assert exc.value.param == "threads"


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
@pytestmark_linux
@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_bench_signal_ends_workers_and_removes_temporary_folders(tmp_path, signum, code):
    model = _loop_model(tmp_path / "slow.onnx")
    tmp = tmp_path / "tmp"
    proc = subprocess.Popen(_cli() + ["bench", str(model), "--batch-sizes", "1", "--timeout", "600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp), cwd=REPO)
    try:
        assert _wait_for(lambda: _workers(model), 120), "the worker never started"
        assert list(tmp.glob("bmrs-bench-*")), "bench made no temporary folder"
        time.sleep(1.0)  # the worker is inside the endless run now
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == code, err
    assert len(lines) == 1 and "Interrupted" in lines[0], err
    assert _wait_for(lambda: not _workers(model), 10), "an _ort_worker survived bench"
    assert not list(tmp.glob("bmrs-bench-*")), "a temporary folder was left behind"


# ------------------------------------------------------------------------------------------------
# item 7: tracebacks from seeds and shapes
# ------------------------------------------------------------------------------------------------


def _toy_npz(tmp_path: Path) -> Path:
    path = tmp_path / "toy.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((20, 1, 4, 4)).astype(np.float32),
             y=np.arange(20) % 3)
    return path


@pytest.mark.parametrize("seed", [-1, 2**70, 2**32, "1", 1.0, True])
@pytest.mark.parametrize("spec", ["digits", "npz"])
def test_load_data_refuses_seeds_torch_numpy_or_sklearn_cannot_take(tmp_path, seed, spec):
    with pytest.raises(DataError) as exc:
        load_data(str(_toy_npz(tmp_path)) if spec == "npz" else spec, seed=seed)
    assert exc.value.param == "seed" and "2**32 - 1" in str(exc.value) and "\n" not in str(exc.value)


def test_load_data_takes_the_whole_seed_range(tmp_path):
    for seed in (0, 2**32 - 1):
        assert len(load_data(str(_toy_npz(tmp_path)), seed=seed).train) > 0


def test_check_seed():
    assert limits.check_seed(0) == 0 and limits.check_seed(2**32 - 1) == 2**32 - 1
    with pytest.raises(JobError) as exc:
        limits.check_seed(2**70)
    assert exc.value.param == "seed" and len(str(exc.value)) < 120


def test_compress_negative_seed_is_one_line(tmp_path):
    res = invoke("mlp", "--data", str(_toy_npz(tmp_path)), "--seed", "-1", "--epochs", "0", "--out", str(tmp_path / "o"))
    assert_one_line_error(res, "--seed")


@pytest.mark.parametrize("command", ["inspect", "check", "bench"])
def test_huge_input_shape_is_refused_before_allocating(command):
    res = invoke(command, "mlp", "--input-shape", "1,3,100000,100000")
    assert_one_line_error(res, "--input-shape", "1,3,100000,100000", "2.0 GiB")


def test_first_layer_output_is_bounded():
    # 1x3x8192x8192 is 768 MiB, under the limit; a 64-channel first convolution would make 16 GiB of it
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU())
    name, nbytes = limits.first_layer_output_bytes(net, (1, 3, 8192, 8192))
    assert name == "0" and nbytes == 64 * 8192 * 8192 * 4
    with pytest.raises(BmrsError, match="first layer"):
        limits.check_first_layer(net, (1, 3, 8192, 8192))
    limits.check_first_layer(net, (1, 3, 224, 224))
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(10, 5))
    assert limits.first_layer_output_bytes(lin, (4, 10)) == ("1", 4 * 5 * 4)
    assert limits.first_layer_output_bytes(net, (1, 1, 8, 8)) is None  # not plainly the input's reader


def test_load_network_checks_the_first_layer(tmp_path):
    from cli._common import load_network

    path = tmp_path / "wide.pt"
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 256, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(256, 10))
    torch.save(net, path)
    with pytest.raises(BmrsError, match="first layer"):
        load_network(str(path), "1,3,4096,4096", None, True)  # 192 MiB in, 16 GiB out of the first conv


# ------------------------------------------------------------------------------------------------
# item 8: resource exhaustion from tiny inputs
# ------------------------------------------------------------------------------------------------


def test_state_dict_shapes_and_class_counts():
    with pytest.raises(ModelLoadError, match=r"declares shape \(1000000000, 0\)"):
        limits.check_state_shapes({"fc.weight": torch.empty(10**9, 0)}, "tiny.pt")
    with pytest.raises(ModelLoadError, match="empty weight"):
        limits.check_state_shapes({"fc.weight": torch.empty(5000, 0)}, "tiny.pt")
    with pytest.raises(ModelLoadError, match="1,000,000,000 classes"):
        limits.check_num_classes(10**9, "tiny.pt")
    assert limits.check_num_classes(None, "x") is None and limits.check_num_classes(10, "x") == 10
    limits.check_state_shapes({"w": torch.zeros(3, 4), "b": torch.zeros(0)}, "ok.pt")
    big = torch.zeros(1).expand(limits.MAX_TENSOR_DIM + 1)
    with pytest.raises(ModelLoadError, match="a dimension over"):
        limits.check_state_shapes({"w": big}, "big.pt")


def _bomb(path: Path, n: int) -> Path:
    np.savez_compressed(path, x=np.zeros((n, 1, 8, 8), np.float32), y=np.zeros(n, np.int64))
    return path


def test_npz_that_expands_past_the_limit_is_refused_from_its_headers(tmp_path, monkeypatch):
    path = _bomb(tmp_path / "bomb.npz", 20000)  # 5 MB of zeros, a few KB compressed
    assert path.stat().st_size < 100_000
    monkeypatch.setenv(limits.DATA_LIMIT_ENV, str(4 / 1024))  # 4 MiB
    loaded = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: loaded.append(a) or real_load(*a, **k))
    with pytest.raises(DataError) as exc:
        load_data(str(path))
    msg = str(exc.value)
    assert "bomb.npz" in msg and "limit" in msg and "(20000, 1, 8, 8)" in msg and "\n" not in msg
    assert not loaded, "the arrays were loaded before the check"
    monkeypatch.delenv(limits.DATA_LIMIT_ENV)
    assert len(load_data(str(path)).train) > 0  # the default limit takes it


def test_npz_header_declaring_terabytes_is_refused_without_allocating(tmp_path):
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open("x.npy", "w") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (10**6, 10**6)})
        with zf.open("y.npy", "w") as fh:
            np.lib.format.write_array(fh, np.zeros(3, np.int64))
    with pytest.raises(DataError) as exc:
        load_data(str(path))
    assert "liar.npz" in str(exc.value) and "limit" in str(exc.value)


def test_npz_members_reads_headers_only(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, x=np.zeros((5, 2), np.uint8), y=np.arange(5))
    members = limits.npz_members(path)
    assert members["x"] == ((5, 2), np.dtype(np.uint8)) and members["y"][0] == (5,)
    assert limits.npz_memory_estimate(members) == 10 + 3 * 40 + 5 * 8 + 3 * 20


def test_npz_object_arrays_still_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([[1, "a"]] * 4, dtype=object), y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="obj.npz"):
        load_data(str(path))


def test_data_limit_env(monkeypatch):
    monkeypatch.setenv(limits.DATA_LIMIT_ENV, "junk")
    with pytest.raises(BmrsError, match=limits.DATA_LIMIT_ENV):
        limits.data_limit()
    monkeypatch.setenv(limits.DATA_LIMIT_ENV, "1")
    assert limits.data_limit() <= limits.GIB


# -- the bounds wired into the job, check and loading -----------------------------------------------

@pytest.mark.parametrize("seed", [-1, 2**70])
def test_job_and_check_refuse_a_seed_out_of_range(seed):
    import bmrs_surgery
    from bmrs_surgery.check import check_model
    from bmrs_surgery.errors import BmrsError
    from models import get_model

    with pytest.raises(BmrsError, match="seed") as caught:
        bmrs_surgery.compress(bmrs_surgery.Job(model="lenet5", data="digits", seed=seed))
    assert caught.value.param == "seed"
    with pytest.raises(BmrsError, match="seed"):
        check_model(get_model("mlp"), (2, 1, 32, 32), seed=seed)


def test_a_job_asking_for_more_threads_than_cores_is_refused_before_any_work():
    import os

    import bmrs_surgery
    from bmrs_surgery.errors import BmrsError

    with pytest.raises(BmrsError) as caught:
        bmrs_surgery.compress(bmrs_surgery.Job(model="lenet5", data="digits", threads=(os.cpu_count() or 1) + 1))
    assert caught.value.param == "threads"


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_state_dict_with_integer_or_complex_weights_is_refused_not_cast(tmp_path, dtype):
    from bmrs_surgery.errors import ModelLoadError
    from bmrs_surgery.loading import load_model
    from models import get_model

    state = get_model("lenet5").state_dict()
    state["0.weight"] = state["0.weight"].to(dtype)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match=r"0\.weight holds torch\.(int64|complex64) numbers"):
        load_model(str(path), arch="lenet5")


def test_state_dict_with_absurd_shapes_is_refused_before_building(tmp_path):
    from bmrs_surgery.errors import BmrsError
    from bmrs_surgery.loading import load_model
    from models import get_model

    state = get_model("lenet5").state_dict()
    state["11.weight"] = torch.empty(10**9, 0)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(BmrsError):
        load_model(str(path), arch="lenet5")
