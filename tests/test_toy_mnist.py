"""toy_mnist.py: the MNIST loader (IDX parsing, MD5 check, download, split), bad input, checksummed checkpoints,
the sampler, and the quick preset end to end on the shared MNIST test split (plus bench/toy_ablation.py)."""

import functools
import gzip
import http.server
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import DOCS, MNIST_DIR, ROOT

import toy_mnist as tm

needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(), reason="no MNIST test split in RANDCOND_MNIST_DIR"
)
TEST_SPLIT = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_raw_split(folder, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TEST_SPLIT[0]).write_bytes(idx_bytes(images))
    (folder / TEST_SPLIT[1]).write_bytes(idx_bytes(labels))


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message.startswith("error:") and "\n" not in message, message
    return message


# --- IDX files and the MD5 check


def test_raw_idx_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    (tmp_path / "x").write_bytes(idx_bytes(images))
    (tmp_path / "y").write_bytes(idx_bytes(np.array([3, 1, 4, 1, 5], dtype=np.uint8)))
    assert np.array_equal(tm.read_idx(tmp_path, "x"), images)
    assert tm.read_idx(tmp_path, "y").tolist() == [3, 1, 4, 1, 5]
    assert tm.read_idx(tmp_path, "missing") is None


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + bytes(12),  # float32 dtype code
        b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes(4),  # truncated
        b"\x00\x00",
        b"",
    ],
)
def test_bad_idx_files_are_one_line_errors(tmp_path, data):
    (tmp_path / "bad").write_bytes(data)
    with pytest.raises(SystemExit) as e:
        tm.read_idx(tmp_path, "bad")
    assert "IDX" in one_line_error(e)


def test_md5_mismatch_is_a_clear_error(tmp_path):
    (tmp_path / f"{TEST_SPLIT[1]}.gz").write_bytes(gzip.compress(idx_bytes(np.arange(10, dtype=np.uint8))))
    with pytest.raises(SystemExit) as e:
        tm.read_idx(tmp_path, TEST_SPLIT[1])
    assert "MD5" in one_line_error(e)


def test_labels_outside_0_9_are_refused(tmp_path):
    write_raw_split(tmp_path, np.zeros((4, 28, 28)), np.array([1, 2, 12, 3]))
    with pytest.raises(SystemExit) as e:
        tm.load_mnist(tmp_path)
    assert "0-9" in one_line_error(e)


def test_images_and_labels_must_match(tmp_path):
    write_raw_split(tmp_path, np.zeros((4, 28, 28)), np.array([1, 2, 3]))
    with pytest.raises(SystemExit) as e:
        tm.load_mnist(tmp_path)
    one_line_error(e)


@needs_mnist
def test_shared_files_pass_md5():
    for name in TEST_SPLIT:
        assert tm.hashlib.md5((MNIST_DIR / f"{name}.gz").read_bytes()).hexdigest() == tm.MNIST_MD5[name]


# --- loading, splitting, downloading


@needs_mnist
def test_test_split_only_is_split_deterministically():
    a, b = tm.load_mnist(MNIST_DIR, seed=0), tm.load_mnist(MNIST_DIR, seed=0)
    assert a["split"] and len(a["x_train"]) == 8000 and len(a["x_heldout"]) == 2000
    assert torch.equal(a["x_train"], b["x_train"]) and torch.equal(a["y_heldout"], b["y_heldout"])
    assert a["x_train"].shape[1:] == (1, 28, 28) and a["x_train"].min() == -1 and a["x_train"].max() == 1
    assert set(a["y_train"].tolist()) == set(range(10)) == set(a["y_heldout"].tolist())
    other = tm.load_mnist(MNIST_DIR, seed=1)
    assert not torch.equal(a["y_heldout"], other["y_heldout"])  # the seed picks the held-out part
    train = {img.numpy().tobytes() for img in a["x_train"]}
    overlap = sum(img.numpy().tobytes() in train for img in a["x_heldout"])
    assert overlap <= 5  # MNIST has a handful of exact duplicates; not a split leak


@needs_mnist
def test_raw_idx_files_load_like_gz(tmp_path):
    for name in TEST_SPLIT:
        (tmp_path / name).write_bytes(gzip.decompress((MNIST_DIR / f"{name}.gz").read_bytes()))
    raw, gz = tm.load_mnist(tmp_path), tm.load_mnist(MNIST_DIR)
    assert torch.equal(raw["x_train"], gz["x_train"]) and torch.equal(raw["y_heldout"], gz["y_heldout"])


@needs_mnist
def test_download_from_a_source_checks_md5(tmp_path, monkeypatch):
    """A source on loopback that serves the test split: it is fetched and verified; the train split is not
    there, so the run stops with one line saying what to pass."""
    served = tmp_path / "served"
    served.mkdir()
    for name in TEST_SPLIT:
        (served / f"{name}.gz").write_bytes((MNIST_DIR / f"{name}.gz").read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:  # the first source refuses the connection, the second serves
        monkeypatch.setattr(tm, "MNIST_URLS", ["http://127.0.0.1:9/", f"http://127.0.0.1:{server.server_port}/"])
        with pytest.raises(SystemExit) as e:
            tm.load_mnist(tmp_path / "data")
        assert "--data-dir" in one_line_error(e)
        assert tm.load_mnist(tmp_path / "data")["split"]  # the test split arrived, MD5-checked, and is enough
    finally:
        server.shutdown()


def test_offline_error_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(tm, "MNIST_URLS", ["http://127.0.0.1:9/"])  # nothing listens on port 9
    with pytest.raises(SystemExit) as e:
        tm.load_mnist(tmp_path / "empty")
    assert "--data-dir" in one_line_error(e)


# --- bad flags: one `error:` line, exit status 1


@pytest.mark.parametrize(
    "argv",
    [
        ["--batch-size", "0"],
        ["--teacher-steps", "-5"],
        ["--student-steps", "0"],
        ["--samples-per-digit", "0"],
        ["--threads", "-1"],
        ["--unseen", "11"],
        ["--unseen", *map(str, range(10))],
        ["--rc-schedule", "constant", "--rc-lambda", "2"],
        ["--rc-schedule", "nope"],
        ["--batch-size", "many"],
        ["--no-such-flag"],
    ],
)
def test_bad_flags_are_one_line_errors(argv):
    with pytest.raises(SystemExit) as e:
        tm.parse_args(argv)
    one_line_error(e)


@pytest.mark.parametrize("schedule", ["sigmoid", "none"])
def test_rc_lambda_is_refused_where_p_t_does_not_read_it(schedule):
    with pytest.raises(SystemExit) as e:
        tm.parse_args(["--rc-schedule", schedule, "--rc-lambda", "2"])
    assert "--rc-lambda" in one_line_error(e)
    assert tm.parse_args(["--rc-schedule", schedule]).rc_lambda is None  # nothing recorded that p(t) ignores


def test_rc_lambda_defaults_to_2_where_p_t_reads_it():
    assert tm.parse_args([]).rc_lambda == 2.0 and tm.parse_args(["--rc-schedule", "two_sided"]).rc_lambda == 2.0
    assert tm.parse_args(["--rc-schedule", "constant", "--rc-lambda", "0.3"]).rc_lambda == 0.3


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(SystemExit) as e:
        tm.parse_args(["--device", "cuda"])
    assert "--device cpu" in one_line_error(e)


def test_command_line_error_exit_status_and_help():
    bad = subprocess.run(
        [sys.executable, "toy_mnist.py", "--batch-size", "0"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 1 and bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
    help_text = subprocess.run([sys.executable, "toy_mnist.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert help_text.returncode == 0 and "1 when other jobs share the CPU" in " ".join(help_text.stdout.split())


def test_quick_preset_changes_only_defaults():
    quick = tm.parse_args(["--preset", "quick", "--student-steps", "7"])
    assert quick.teacher_widths == [8, 16, 16] and quick.student_steps == 7 and quick.teacher_steps == 60
    assert tm.parse_args([]).teacher_steps == 1500


# --- checkpoints: checksum recorded at save time, verified on load


def test_damaged_checkpoint_is_retrained(tmp_path, capsys):
    path, trained = tmp_path / "judge.safetensors", []

    def train(model):
        trained.append(1)
        torch.nn.init.constant_(model[0].weight, 0.5)

    def load():
        return tm.load_or_train(path, {"steps": 1}, tm.classifier(4), train, retrain=False)

    first = load()
    assert len(trained) == 1 and path.exists()
    assert torch.equal(load()[0].weight, first[0].weight) and len(trained) == 1  # reused, verified
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the weights
    path.write_bytes(bytes(data))
    load()
    assert len(trained) == 2 and "checksum" in capsys.readouterr().out
    path.write_bytes(path.read_bytes()[:500])  # truncated
    load()
    assert len(trained) == 3 and "damaged" in capsys.readouterr().out
    tm.load_or_train(path, {"steps": 2}, tm.classifier(4), train, retrain=False)  # other settings
    assert len(trained) == 4 and "other settings" in capsys.readouterr().out


# --- model and sampler


def test_unet_shapes_and_deterministic_ddim():
    torch.manual_seed(0)
    model = tm.UNet((8, 16, 16)).eval()
    x = torch.randn(4, 1, 28, 28)
    assert model(x, torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10])).shape == (4, 1, 28, 28)
    abar = tm.ALPHAS_CUMPROD
    assert 0.99 < abar[0] <= 1 and abar[-1] < 1e-3 and torch.all(abar[1:] < abar[:-1])
    noise, labels = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5])
    a = tm.ddim_sample(model, labels, noise, steps=4, guidance=3.0)
    b = tm.ddim_sample(model, labels[:3], noise[:3], steps=4, guidance=3.0)
    assert a.shape == (6, 1, 28, 28) and a.abs().max() <= 1 + 1e-5
    # each sample depends on its own noise and label only; batch size changes float rounding (2.6e-4 seen on 2 threads)
    assert torch.allclose(a[:3], b, atol=2e-3)


def test_ddim_from_a_noised_image():
    """start = t denoises an image noised to t: at t = 0 one step returns the image itself (up to sqrt(1 - abar_0)
    = 0.01 of the predicted noise); start = T - 1 is the default."""
    torch.manual_seed(0)
    model = tm.UNet((8, 16, 16)).eval()
    images, labels = torch.rand(3, 1, 28, 28) * 2 - 1, torch.tensor([1, 2, 3])
    x_0 = tm.add_noise(images, torch.randn_like(images), torch.zeros(3, dtype=torch.long))
    assert torch.allclose(tm.ddim_sample(model, labels, x_0, steps=1, guidance=1.0, start=0), images, atol=0.05)
    noise = torch.randn(3, 1, 28, 28)
    assert torch.equal(
        tm.ddim_sample(model, labels, noise, 3, 2.0), tm.ddim_sample(model, labels, noise, 3, 2.0, tm.T - 1)
    )


def test_comparison_figure_labels_rows_and_columns(tmp_path):
    """comparison.png names each model above its column and each digit left of its row, the unseen one in red."""
    cfg = tm.parse_args(["--preset", "quick", "--unseen", "3"])
    torch.manual_seed(0)
    models = {name: tm.UNet(cfg.teacher_widths).eval() for name in ("teacher", "student_no_rc", "student_rc")}
    tm.evaluate(cfg, models, tm.classifier(4).eval(), tmp_path)
    fig = np.asarray(tm.Image.open(tmp_path / "comparison.png").convert("RGB")).astype(int)
    left, top, row = 60, 50, 30  # the layout evaluate draws: label margin, title and names, one row per digit
    label = fig[top : top + 10 * row, :left]  # (10 * row, left, 3)
    ink = (label.sum(-1) < 600).reshape(10, row, left).any(axis=(1, 2))
    red = ((label[..., 0] > 150) & (label[..., 1] < 100)).reshape(10, row, left).any(axis=(1, 2))
    assert ink.all() and red.tolist() == [d == 3 for d in range(10)]
    names = fig[15:32, left:]  # a model's name above every column
    width = (fig.shape[1] - left) // 3
    assert all((names[:, i * width : (i + 1) * width].sum(-1) < 300).any() for i in range(3))


def test_student_is_a_quarter_of_the_teacher():
    cfg = tm.parse_args([])
    ratio = sum(p.numel() for p in tm.UNet(cfg.student_widths).parameters()) / sum(
        p.numel() for p in tm.UNet(cfg.teacher_widths).parameters()
    )
    assert 0.2 < ratio < 0.35
    assert all(name in dict(tm.UNet(cfg.student_widths).named_modules()) for name in tm.FEATURE_LAYERS)


# --- end to end


@needs_mnist
@pytest.mark.parametrize("images", ["real", "teacher"])
def test_quick_preset_end_to_end(tmp_path, monkeypatch, images, capsys):
    seen_by_students = []
    original = tm.train_students

    def spy(cfg, schedules, teacher, x, y, *args):
        seen_by_students.append((x.clone(), y.clone()))
        return original(cfg, schedules, teacher, x, y, *args)

    monkeypatch.setattr(tm, "train_students", spy)
    out = tmp_path / "run"
    argv = ["--preset", "quick", "--data-dir", str(MNIST_DIR), "--out", str(out), "--images", images, "--threads", "1"]
    report = tm.main(argv)

    # the students never see the unseen digit: not as a label, and (real images) not as an image
    x, y = seen_by_students[0]
    assert 3 not in y.tolist() and len(y) > 0
    if images == "real":
        data = tm.load_mnist(MNIST_DIR)
        threes = {img.numpy().tobytes() for img in data["x_train"][data["y_train"] == 3]}
        assert not any(img.numpy().tobytes() in threes for img in x)
        assert len(x) == int((data["y_train"] != 3).sum())
    else:
        assert len(x) == 64 and x.abs().max() <= 1 + 1e-5  # the teacher's samples of seen digits

    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert "mean nothing" in saved["note"] and "mean nothing" in capsys.readouterr().out
    assert saved["unseen"] == [3] and saved["data"]["train"] == 8000 and saved["data"]["heldout"] == 2000
    for name in ("teacher", "student_no_rc", "student_rc"):
        m = saved["models"][name]
        assert len(m["per_class_accuracy"]) == 10 and 0 <= m["seen_mean"] <= 1 and 0 <= m["unseen_mean"] <= 1
        assert m["seen_mean"] == pytest.approx(np.mean([a for d, a in enumerate(m["per_class_accuracy"]) if d != 3]))
        assert tm.Image.open(out / f"samples_{name}.png").size == (4 * 30 + 2, 10 * 30 + 2)  # 4 a digit, 10 rows
    assert saved["models"]["student_rc"]["params"] < saved["models"]["teacher"]["params"]
    assert set(saved["timings_s"]) >= {"teacher and judge", "classifier", "students", "sampling", "total"}
    assert 0 <= saved["judge_heldout_accuracy"] <= 1 and 0 <= saved["classifier_unseen_accuracy"] <= 1
    assert tm.Image.open(out / "comparison.png").size[0] > 3 * 4 * 30

    if images == "real":  # a second run reuses teacher and judge: identical weights, no training time
        before = (out / "teacher.safetensors").read_bytes()
        again = tm.main(argv)
        assert (out / "teacher.safetensors").read_bytes() == before
        assert again["models"]["teacher"] == report["models"]["teacher"]
        assert again["judge_heldout_accuracy"] == report["judge_heldout_accuracy"]
        assert again["timings_s"]["teacher and judge"] < 2


@needs_mnist
def test_quick_ablation_and_learning_curve(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import toy_ablation

    argv = ["--preset", "quick", "--data-dir", str(MNIST_DIR), "--out", str(tmp_path), "--threads", "1"]
    report = toy_ablation.main(argv + ["--eval-every", "20", "--target", "0"])
    assert [r["schedule"] for r in report["students"]] == toy_ablation.SCHEDULES
    for r in report["students"]:
        assert [step for step, _ in r["curve"]] == [20, 40] and r["first_step_at_target"] == 20
        assert 0 <= r["unseen_mean"] <= 1 and 0 <= r["seen_mean"] <= 1
    assert json.loads((tmp_path / "ablation.json").read_text())["target"] == 0
    with pytest.raises(SystemExit) as e:
        toy_ablation.main(argv + ["--schedules", "exp:x"])
    one_line_error(e)


def test_readme_ablation_commands_parse(tmp_path, monkeypatch):
    """Every line of the docs that runs bench/toy_ablation.py parses: its own flags, the rest are toy_mnist.py's."""
    sys.path.insert(0, str(ROOT / "bench"))
    import toy_ablation

    class Parsed(Exception):
        pass

    def stop(*args):
        raise Parsed

    monkeypatch.setattr(toy_ablation.tm, "load_mnist", stop)  # stop after parsing: no data, no training
    text = "\n".join(doc.read_text(encoding="utf-8") for doc in DOCS)
    lines = [line for line in text.splitlines() if line.startswith("python bench/toy_abl")]
    assert lines
    for line in lines:
        argv = line.split("#")[0].split("toy_ablation.py", 1)[1].replace("DIR", str(tmp_path)).split()
        with pytest.raises(Parsed):
            toy_ablation.main(argv + ["--out", str(tmp_path / "out")])
