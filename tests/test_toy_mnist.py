"""toy_mnist.py: the MNIST loader (IDX parsing, MD5 check, download, split), the sampler, and the
quick preset end to end on the shared MNIST test split."""

import functools
import gzip
import http.server
import json
import shutil
import threading

import numpy as np
import pytest
import torch
from conftest import MNIST_DIR

import toy_mnist as tm

needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(), reason="shared MNIST test split not present"
)


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


# --- IDX parsing and the MD5 check


def test_parse_idx_round_trip():
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    assert np.array_equal(tm.parse_idx(idx_bytes(images)), images)
    assert np.array_equal(tm.parse_idx(idx_bytes(labels)), labels)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + bytes(12), "bad magic"),  # float32 dtype code
        (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes(4), "header says"),  # truncated
        (b"\x00\x00", "bad magic"),
    ],
)
def test_parse_idx_rejects_bad_files(data, message):
    with pytest.raises(ValueError, match=message):
        tm.parse_idx(data)


def test_md5_mismatch_is_a_clear_error(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(10, dtype=np.uint8))))  # valid IDX, not the official file
    with pytest.raises(SystemExit, match="MD5"):
        tm.read_idx(path)


@needs_mnist
def test_shared_files_pass_md5():
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert tm.md5sum(MNIST_DIR / f"{name}.gz") == tm.MNIST_FILES[name]


# --- loading and splitting


@needs_mnist
def test_test_split_only_is_split_deterministically():
    a = tm.load_mnist(MNIST_DIR, seed=0)
    b = tm.load_mnist(MNIST_DIR, seed=0)
    assert a["split"] and len(a["x_train"]) == 8000 and len(a["x_heldout"]) == 2000
    assert torch.equal(a["x_train"], b["x_train"]) and torch.equal(a["y_heldout"], b["y_heldout"])
    assert a["x_train"].shape[1:] == (1, 28, 28) and a["x_train"].min() == -1 and a["x_train"].max() == 1
    assert set(a["y_train"].tolist()) == set(range(10)) == set(a["y_heldout"].tolist())
    # the two parts are disjoint: no held-out image is also a training image
    train = {bytes(img.numpy().tobytes()) for img in a["x_train"].to(torch.int8)}
    overlap = sum(bytes(img.numpy().tobytes()) in train for img in a["x_heldout"].to(torch.int8))
    assert overlap <= 5  # MNIST has a handful of exact duplicates (blank-ish strokes); not a split leak


@needs_mnist
def test_raw_idx_files_load_like_gz(tmp_path):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(gzip.decompress((MNIST_DIR / f"{name}.gz").read_bytes()))
    raw, gz = tm.load_mnist(tmp_path), tm.load_mnist(MNIST_DIR)
    assert torch.equal(raw["x_train"], gz["x_train"]) and torch.equal(raw["y_heldout"], gz["y_heldout"])


@needs_mnist
def test_download_from_a_mirror_checks_md5(tmp_path, monkeypatch):
    """A mirror on loopback serving the shared files: the missing test split is fetched and verified."""
    served = tmp_path / "mirror"
    served.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(MNIST_DIR / f"{name}.gz", served / f"{name}.gz")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # the first mirror refuses, the second has no train split: the loader falls back to splitting
        monkeypatch.setattr(tm, "MNIST_MIRRORS", ["http://127.0.0.1:9/", f"http://127.0.0.1:{server.server_port}/"])
        with pytest.raises(SystemExit, match="--data-dir"):
            tm.load_mnist(tmp_path / "data")  # train files are not on the mirror
        data_dir = tmp_path / "data"
        assert (data_dir / "t10k-images-idx3-ubyte.gz").exists()  # the test split did arrive, MD5-checked
        assert not list(data_dir.glob("*.part"))
    finally:
        server.shutdown()


def test_offline_error_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(tm, "MNIST_MIRRORS", ["http://127.0.0.1:9/"])  # nothing listens on port 9
    with pytest.raises(SystemExit) as e:
        tm.load_mnist(tmp_path / "empty")
    message = str(e.value)
    assert message.startswith("error:") and "--data-dir" in message and "\n" not in message


def test_without_digits():
    x = torch.arange(10.0).view(10, 1, 1, 1)
    y = torch.tensor([0, 3, 1, 3, 5, 7, 3, 9, 2, 4])
    xs, ys = tm.without_digits(x, y, [3, 7])
    assert 3 not in ys.tolist() and 7 not in ys.tolist() and len(ys) == 6
    assert torch.equal(xs.flatten(), torch.tensor([0.0, 2, 4, 7, 8, 9]))


# --- model and sampler


def test_unet_shapes_and_deterministic_ddim():
    torch.manual_seed(0)
    model = tm.UNet((8, 16, 16)).eval()
    x = torch.randn(4, 1, 28, 28)
    assert model(x, torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10])).shape == (4, 1, 28, 28)
    abar = tm.ddpm_schedule(1000)
    assert 0.99 < abar[0] <= 1 and abar[-1] < 1e-3 and torch.all(abar[1:] < abar[:-1])
    noise, labels = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5])
    a = tm.ddim_sample(model, labels, noise, abar, steps=4, guidance=3.0, batch_size=4)
    b = tm.ddim_sample(model, labels, noise, abar, steps=4, guidance=3.0, batch_size=6)
    assert a.shape == (6, 1, 28, 28) and a.abs().max() <= 1 + 1e-5
    assert torch.allclose(a, b, atol=1e-5)  # batch-size independent: same noise, same images


def test_student_is_a_quarter_of_the_teacher():
    cfg = tm.Config()
    ratio = tm.num_params(tm.UNet(cfg.student_widths)) / tm.num_params(tm.UNet(cfg.teacher_widths))
    assert 0.2 < ratio < 0.35


def test_bad_flags_exit_cleanly():
    with pytest.raises(SystemExit):
        tm.parse_args(["--unseen", "11"])
    with pytest.raises(SystemExit):
        tm.parse_args(["--rc-schedule", "constant", "--rc-lambda", "2"])


# --- end to end


@needs_mnist
@pytest.mark.parametrize("images", ["real", "teacher"])
def test_quick_preset_end_to_end(tmp_path, monkeypatch, images):
    seen_by_students = []
    original = tm.train_students

    def spy(cfg, arms, teacher, x, y, *args):
        seen_by_students.append((x.clone(), y.clone()))
        return original(cfg, arms, teacher, x, y, *args)

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

    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["unseen"] == [3] and saved["data"] == {**saved["data"], "train": 8000, "heldout": 2000}
    for name in ("teacher", "student_no_rc", "student_rc"):
        m = saved["models"][name]
        assert len(m["per_class_accuracy"]) == 10 and 0 <= m["seen_mean"] <= 1 and 0 <= m["unseen_mean"] <= 1
        assert (out / f"samples_{name}.png").stat().st_size > 0
    assert saved["models"]["student_rc"]["params"] < saved["models"]["teacher"]["params"]
    assert set(saved["timings_s"]) >= {"teacher", "judge", "student_no_rc", "student_rc", "sampling", "total"}
    assert 0 <= saved["judge_heldout_accuracy"] <= 1 and 0 <= saved["classifier_student_unseen_accuracy"] <= 1
    for name in ("teacher.safetensors", "judge.safetensors", "comparison.png"):
        assert (out / name).exists()

    if images == "real":
        # a second run reuses teacher and judge (identical weights, no training time)
        before = (out / "teacher.safetensors").read_bytes()
        again = tm.main(argv)
        assert (out / "teacher.safetensors").read_bytes() == before
        assert again["models"]["teacher"] == report["models"]["teacher"]
        assert again["judge_heldout_accuracy"] == report["judge_heldout_accuracy"]
        assert again["timings_s"]["teacher"] < 2


@needs_mnist
def test_quick_ablation_covers_every_schedule(tmp_path):
    report = tm.main(
        ["--preset", "quick", "--data-dir", str(MNIST_DIR), "--out", str(tmp_path), "--ablate", "--threads", "1"]
    )
    got = {(r["schedule"], r["lam"]) for r in report["ablation"]}
    assert got >= {(s, lam) for s, lam in tm.ABLATION}
    assert all(0 <= r["unseen_mean"] <= 1 and 0 <= r["seen_mean"] <= 1 for r in report["ablation"])
    assert (tmp_path / "ablation.png").stat().st_size > 0
