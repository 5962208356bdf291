"""A user's own data and weights (issue 18): ``imagefolder:DIR``, ``csv:FILE --target``,
``--weights``/``--pretrained`` from local caches. The image folders are real: Fashion-MNIST sample
images written as PNG files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bmrs_surgery.data import check_fits, head, load_data, split_batches
from bmrs_surgery.errors import DataError, JobError, ModelLoadError
from bmrs_surgery.imagefolder import ImageOptions
from bmrs_surgery.job import Job
from cli.main import cli

PIL = pytest.importorskip("PIL.Image")
SAMPLE = Path(__file__).resolve().parents[1] / "bmrs_surgery" / "samples" / "fashion_mnist_sample.npz"
CLASSES = ("tshirt", "trouser", "pullover")  # Fashion-MNIST labels 0, 1, 2


def write_pngs(root: Path, per_class: int, offset: int = 0, split: str = "train") -> None:
    """``per_class`` Fashion-MNIST images of each of CLASSES as PNG files under root/CLASS/."""
    with np.load(SAMPLE) as z:
        x, y = z[f"x_{split}"], z[f"y_{split}"]
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(np.flatnonzero(y == label)[offset:offset + per_class]):
            PIL.fromarray(x[i]).save(folder / f"{j:04d}.png")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_pngs(root, 20)
    return root


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def invoke(*args):
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=True)


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------------
# imagefolder:DIR
# ------------------------------------------------------------------------------------------------


def test_image_folder_split_80_20_per_class_with_the_seed(folder):
    opts = ImageOptions(size=32, channels=1, mean=(0.5,), std=(0.25,))
    d = load_data(f"imagefolder:{folder}", image=opts, seed=3)
    assert d.num_classes == 3 and d.classes == list(sorted(CLASSES))
    assert d.input_shape == (1, 32, 32)
    assert (len(d.train), len(d.test)) == (48, 12)  # 16 + 4 per class
    assert d.val is d.test
    train_paths = {p for p, _ in d.train.samples}
    assert not train_paths & {p for p, _ in d.test.samples}
    again = load_data(f"imagefolder:{folder}", image=opts, seed=3)
    assert [p for p, _ in again.test.samples] == [p for p, _ in d.test.samples]
    other = load_data(f"imagefolder:{folder}", image=opts, seed=4)
    assert [p for p, _ in other.test.samples] != [p for p, _ in d.test.samples]
    for _, label in d.test.samples:
        assert 0 <= label < 3


def test_image_folder_transforms_normalise_with_the_given_statistics(folder):
    opts = ImageOptions(size=24, channels=1, mean=(0.5,), std=(0.25,))
    d = load_data(f"imagefolder:{folder}", image=opts)
    x = head(d.test, 4)
    assert x.shape == (4, 1, 24, 24) and x.dtype == torch.float32
    # pixel 0 -> (0 - 0.5) / 0.25 = -2; Fashion-MNIST backgrounds are black
    assert float(x.min()) == pytest.approx(-2.0, abs=1e-6)
    assert float(x.max()) <= (1 - 0.5) / 0.25 + 1e-6
    # evaluation is deterministic (resize + centre crop); fitting is random (crop + flip)
    assert torch.equal(head(d.test, 2), head(d.test, 2))
    torch.manual_seed(0)
    a = head(d.train, 4)
    torch.manual_seed(1)
    b = head(d.train, 4)
    assert not torch.equal(a, b)
    rgb = load_data(f"imagefolder:{folder}", image=ImageOptions(size=24))
    assert head(rgb.test, 1).shape == (1, 3, 24, 24)


def test_image_folder_batches_come_from_worker_processes(folder):
    opts = ImageOptions(size=16, channels=1)
    d = load_data(f"imagefolder:{folder}", image=opts)
    order = [torch.tensor([0, 5, 7]), torch.tensor([1, 2])]
    got = list(d.test.batches(order, "cpu", workers=2))
    assert [tuple(x.shape) for x, _ in got] == [(3, 1, 16, 16), (2, 1, 16, 16)]
    assert got[0][1].tolist() == [d.test.samples[i][1] for i in (0, 5, 7)]
    in_process = list(split_batches(d.test, order, "cpu"))
    assert torch.equal(in_process[1][0], got[1][0])


def test_train_and_val_subfolders(tmp_path):
    write_pngs(tmp_path / "train", 6)
    write_pngs(tmp_path / "val", 3, split="test")
    d = load_data(f"imagefolder:{tmp_path}", image=ImageOptions(size=16, channels=1))
    assert (len(d.train), len(d.test)) == (18, 9)
    assert all("/val/" in p for p, _ in d.test.samples)
    (tmp_path / "val" / "tshirt").rename(tmp_path / "val" / "shirt")
    with pytest.raises(DataError) as e:
        load_data(f"imagefolder:{tmp_path}")
    assert "different classes" in _one_line(e)


def test_bad_image_folders_are_one_line(tmp_path):
    write_pngs(tmp_path / "a", 4)
    root = tmp_path / "a"
    (root / "empty").mkdir()
    with pytest.raises(DataError) as e:
        load_data(f"imagefolder:{root}")
    assert "empty" in _one_line(e) and "holds no images" in str(e.value)
    (root / "empty").rmdir()
    (root / "trouser" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError) as e:
        load_data(f"imagefolder:{root}")
    assert "broken.png cannot be read" in _one_line(e)
    (root / "trouser" / "broken.png").unlink()
    (root / "trouser" / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as e:
        load_data(f"imagefolder:{root}")
    assert "notes.txt is not an image" in _one_line(e)
    with pytest.raises(DataError) as e:
        load_data(f"imagefolder:{tmp_path / 'missing'}")
    assert "not found" in _one_line(e)
    with pytest.raises(DataError) as e:
        load_data(f"imagefolder:{root / 'trouser' / 'notes.txt'}")
    assert "is a file, not a folder" in _one_line(e)


def test_a_truncated_image_stops_with_its_name(tmp_path):
    write_pngs(tmp_path, 3)
    victim = tmp_path / "pullover" / "0001.png"
    victim.write_bytes(victim.read_bytes()[:60])  # the header survives, the pixels do not
    d = load_data(f"imagefolder:{tmp_path}", image=ImageOptions(size=16, channels=1))
    everything = [torch.arange(len(d.train))]
    with pytest.raises(DataError) as e:
        list(d.train.batches(everything, "cpu", workers=0))
    assert "0001.png cannot be decoded" in _one_line(e)
    with pytest.raises(DataError) as e:
        list(d.train.batches(everything, "cpu", workers=1))
    assert "0001.png cannot be decoded" in _one_line(e)


def test_compress_fits_and_prunes_on_an_image_folder(folder, tmp_path):
    out = tmp_path / "out"
    result = invoke("lenet5", "--data", f"imagefolder:{folder}", "--image-size", "32", "--epochs", "1",
                    "--finetune-epochs", "0", "--batch-size", "16", "-q", "--bench-batch-sizes", "", "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    doc = json.loads((out / "report.json").read_text())
    assert doc["data"] == f"imagefolder:{folder}"
    assert doc["totals"]["accuracy_split"] == "test" and 0.0 <= doc["totals"]["accuracy_after"] <= 1.0
    assert doc["fit"]["history"][0]["val_accuracy"] >= 0.0
    assert doc["weights"]["source"] == "initial"


# ------------------------------------------------------------------------------------------------
# csv:FILE --target COLUMN
# ------------------------------------------------------------------------------------------------


def write_digits_csv(path: Path, rows: int = 300, label_names: bool = False) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([f"p{i}" for i in range(64)] + ["label"])
        for x, y in zip(bunch.data[:rows], bunch.target[:rows]):
            w.writerow([f"{v:g}" for v in x] + [f"digit-{y}" if label_names else int(y)])


def test_csv_with_a_target_column(tmp_path):
    path = tmp_path / "digits.csv"
    write_digits_csv(path)
    d = load_data(f"csv:{path}", target="label", seed=0)
    assert d.input_shape == (64,) and d.num_classes == 10
    assert sum(d.sizes()) == 300 and len(d.test) == 60
    x, _ = d.train.tensors
    assert torch.allclose(x.mean(0), torch.zeros(64), atol=1e-5)  # standardised on the training rows
    named = tmp_path / "named.csv"
    write_digits_csv(named, label_names=True)
    n = load_data(f"csv:{named}", target="label", seed=0)
    assert n.num_classes == 10 and torch.equal(n.test.tensors[1], d.test.tensors[1])  # sorted names = digits


def test_bad_csv_is_one_line(tmp_path):
    path = tmp_path / "digits.csv"
    write_digits_csv(path, rows=20)
    with pytest.raises(DataError) as e:
        load_data(f"csv:{path}", target="class")
    assert "has no column 'class'" in _one_line(e) and e.value.param == "target"
    with pytest.raises(DataError) as e:
        load_data(f"csv:{path}")
    assert "--target" in _one_line(e)
    lines = path.read_text().splitlines()
    cells = lines[3].split(",")
    cells[5] = "abc"
    lines[3] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_data(f"csv:{path}", target="label")
    assert "row 4, column 'p5' is 'abc', not a number" in _one_line(e)
    lines[3] = ",".join(cells[:10])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_data(f"csv:{path}", target="label")
    assert "row 4 has 10 cells" in _one_line(e)


def test_cli_csv_missing_target_column_exits_2(tmp_path):
    path = tmp_path / "digits.csv"
    write_digits_csv(path, rows=40)
    out = tmp_path / "out"
    r = invoke("mlp", "--data", f"csv:{path}", "--target", "nope", "--epochs", "1", "-q", "--out", out)
    assert_one_line_error(r, "--target", "no column 'nope'")
    assert not out.exists() or not any(out.iterdir())
    r = invoke("mlp", "--data", "digits", "--target", "label", "-q", "--out", out)
    assert_one_line_error(r, "--target", "csv:FILE")


def test_csv_data_fits_a_network_that_takes_its_features(tmp_path):
    path = tmp_path / "digits.csv"
    write_digits_csv(path, rows=200)
    d = load_data(f"csv:{path}", target="label")
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    check_fits(net, d)
    with pytest.raises(DataError):
        check_fits(torch.nn.Sequential(torch.nn.Linear(10, 10)), d)


# ------------------------------------------------------------------------------------------------
# Weights from local caches (never downloaded)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def _job(**kw) -> Job:
    return Job(**{"model": "torchvision:resnet18", **kw})


def test_torchvision_weights_missing_file_names_it_and_the_folder(torch_home):
    from bmrs_surgery.weights import load_for_job

    with pytest.raises(ModelLoadError) as e:
        load_for_job(_job(weights="DEFAULT"))
    msg = _one_line(e)
    assert "ResNet18_Weights.IMAGENET1K_V1 needs the file resnet18-f37072fd.pth" in msg
    assert str(torch_home) in msg and "nothing is downloaded" in msg
    assert not torch_home.exists() or not any(torch_home.iterdir())


def test_torchvision_weights_from_the_torch_home_cache(torch_home):
    import torchvision

    from bmrs_surgery.weights import load_for_job

    torch.manual_seed(5)
    reference = torchvision.models.resnet18()
    torch_home.mkdir(parents=True)
    torch.save(reference.state_dict(), torch_home / "resnet18-f37072fd.pth")
    for spec in ("DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"):
        loaded, info = load_for_job(_job(weights=spec))
        assert torch.equal(loaded.model.conv1.weight, reference.conv1.weight)
        assert torch.equal(loaded.model.fc.bias, reference.fc.bias)
        assert info.source == "torchvision" and info.name == "ResNet18_Weights.IMAGENET1K_V1"
        assert info.mean == pytest.approx([0.485, 0.456, 0.406]) and len(info.sha256) == 64
    with pytest.raises(JobError) as e:
        load_for_job(_job(weights="IMAGENET9K"))
    assert "IMAGENET1K_V1" in _one_line(e) and e.value.param == "weights"


def test_weights_file_into_a_named_architecture(tmp_path):
    import torchvision

    from bmrs_surgery.weights import load_for_job

    mine = torchvision.models.resnet18(num_classes=3)
    path = tmp_path / "mine.pth"
    torch.save(mine.state_dict(), path)
    loaded, info = load_for_job(_job(weights=str(path)))
    assert loaded.model.fc.out_features == 3
    assert torch.equal(loaded.model.layer4[1].conv2.weight, mine.layer4[1].conv2.weight)
    assert info.source == "file" and info.file == str(path)
    torch.save({"fc.weight": torch.zeros(3, 7)}, path)
    with pytest.raises(ModelLoadError) as e:
        load_for_job(_job(weights=str(path)))
    assert "does not match" in _one_line(e)


def test_pretrained_timm_from_the_hugging_face_cache(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    safetensors = pytest.importorskip("safetensors.torch")
    from bmrs_surgery.weights import load_for_job

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError) as e:
        load_for_job(Job(model="timm:resnet10t", pretrained=True))
    msg = _one_line(e)
    assert "model.safetensors" in msg and "timm/resnet10t.c3_in1k" in msg and "nothing is downloaded" in msg
    torch.manual_seed(7)
    reference = timm.create_model("resnet10t")
    repo = tmp_path / "hub" / "models--timm--resnet10t.c3_in1k"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    safetensors.save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(snapshot / "model.safetensors"))
    loaded, info = load_for_job(Job(model="timm:resnet10t", pretrained=True))
    assert torch.equal(loaded.model.fc.weight, reference.fc.weight)
    assert info.source == "timm" and info.name == "timm/resnet10t.c3_in1k" and loaded.arch == "timm:resnet10t"


def test_weights_options_are_checked_before_any_work():
    with pytest.raises(JobError) as e:
        Job(model="torchvision:resnet18", pretrained=True).validate()
    assert e.value.param == "pretrained"
    with pytest.raises(JobError) as e:
        Job(model="lenet5", weights="DEFAULT").validate()
    assert e.value.param == "weights"
    with pytest.raises(JobError) as e:
        Job(model="timm:resnet10t", pretrained=True, weights="DEFAULT").validate()
    assert e.value.param == "pretrained"


def test_report_records_the_weights_used(tmp_path):
    from bmrs_surgery.pipeline import compress
    from models import get_model

    path = tmp_path / "lenet5.pt"
    torch.save(get_model("lenet5").state_dict(), path)
    result = compress(Job(model="lenet5", weights=str(path), data="digits", epochs=1, finetune_epochs=0,
                          bench_batch_sizes=()))
    w = result.report["weights"]
    assert w["source"] == "file" and w["file"] == str(path) and len(w["sha256"]) == 64


# ------------------------------------------------------------------------------------------------
# --distill and --lr-schedule cosine
# ------------------------------------------------------------------------------------------------


def test_distillation_loss_is_cross_entropy_when_student_equals_teacher():
    from bmrs_surgery.distill import Distiller

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    d = Distiller(net, "cpu", temperature=4.0, weight=0.5)
    ce = torch.nn.functional.cross_entropy(net(x), y, reduction="sum")
    with torch.no_grad():
        assert float(d.loss(net(x), y, x)) == pytest.approx(0.5 * float(ce), rel=1e-5)
    other = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        assert float(d.loss(other(x), y, x)) > 0.5 * float(torch.nn.functional.cross_entropy(other(x), y,
                                                                                             reduction="sum"))
    assert not any(p.requires_grad for p in d.teacher.parameters())


def test_distillation_pulls_the_student_to_the_teacher():
    from bmrs_surgery.distill import Distiller

    torch.manual_seed(1)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 4))
    student = torch.nn.Sequential(torch.nn.Linear(8, 4))
    d = Distiller(teacher, "cpu", temperature=2.0, weight=1.0)
    x = torch.randn(256, 8)
    y = torch.zeros(256, dtype=torch.long)
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    first = float(d.loss(student(x), y, x).detach())
    for _ in range(100):
        loss = d.loss(student(x), y, x) / len(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(d.loss(student(x), y, x).detach()) < 0.05 * first  # weight 1: the labels play no part


def test_cosine_schedule_within_a_phase():
    from bmrs_surgery.distill import cosine_factor

    assert cosine_factor(0, 0, 10, 0, 4) == pytest.approx(1.0)
    assert cosine_factor(2, 0, 10, 0, 4) == pytest.approx(0.5)
    assert cosine_factor(3, 9, 10, 0, 4) < 0.01
    assert cosine_factor(5, 0, 10, 5, 2) == pytest.approx(1.0)  # fine-tuning starts again at 1


def test_compress_with_distill_and_cosine(tmp_path):
    from bmrs_surgery.pipeline import compress

    result = compress(Job(model="lenet5", data="digits", epochs=1, finetune_epochs=1, bench_batch_sizes=(),
                          distill=True, lr_schedule="cosine"))
    cfg = result.report["fit"]["config"]
    assert cfg["distill"] is True and cfg["lr_schedule"] == "cosine"
    assert [h["phase"] for h in result.report["fit"]["history"]] == ["fit", "finetune"]
    assert 0.0 <= result.report["totals"]["accuracy_pruned"] <= 1.0
    with pytest.raises(JobError):
        Job(model="lenet5", distill=True).validate()


# ------------------------------------------------------------------------------------------------
# The end-to-end example of docs/user_data.md (issue 18, item 6), made small
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_example_resnet18_weights_file_image_folder_half_macs_auto_widths(tmp_path):
    import torchvision

    write_pngs(tmp_path / "images", 6)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "resnet18.pth")
    out = tmp_path / "out"
    r = invoke("torchvision:resnet18", "--weights", tmp_path / "resnet18.pth", "--data", f"imagefolder:{tmp_path / 'images'}",
               "--image-size", "32", "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "8",
               "--target-macs", "0.5", "--round-to", "auto", "--bench-batch-sizes", "1", "-q", "--out", out)
    assert r.exit_code == 0, (r.output, r.exception)
    assert (out / "pruned.onnx").stat().st_size > 0 and (out / "report.html").is_file()
    doc = json.loads((out / "report.json").read_text())
    counts = doc["surgery"]["counts"]
    assert counts["macs_ratio"] <= 0.5 and doc["plan"]["budget"]["met"]
    assert doc["plan"]["round_to"] == "auto" and doc["plan"]["widths"]
    for c in doc["plan"]["widths"].values():
        assert c["chosen"] >= c["kept"]
    assert doc["weights"]["source"] == "file" and doc["weights"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    bench = doc["surgery"]["benchmark"]["ratios_vs_first"][0]["batches"][0]
    assert bench["median_ratio"] > 0  # the speed-up is measured and reported
    table = json.loads((out / "latency_table.json").read_text())
    assert table["entries"] and table["machine"]["onnxruntime"]
