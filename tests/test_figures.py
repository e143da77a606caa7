"""docs/figures.py: p(t) and its swap shares, the condition-influence figure in its quick mode, a run's log curves."""

import json
import math
import sys

import pytest
from conftest import MNIST_DIR, ROOT
from PIL import Image

import randcond

sys.path.insert(0, str(ROOT / "docs"))
import figures  # noqa: E402


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message.startswith("error:") and "\n" not in message, message
    return message


def test_p_t_shares_are_the_means_of_p_t(tmp_path):
    """The legend's share of swapped samples is the mean of p(t) over t: the integral of p over s = t/T in [0, 1]."""
    shares = figures.main(["p_t", "--png", str(tmp_path / "p_t.png")])
    assert {key.split(":")[0] for key in shares} == set(randcond.SCHEDULES)
    for lam in (2, 5, 10):  # integral of exp(-lam (1 - s)) ds
        assert shares[f"exp:{lam}"] == pytest.approx((1 - math.exp(-lam)) / lam, abs=2e-3)
    assert shares["two_sided:5"] == pytest.approx(2 * (1 - math.exp(-2.5)) / 5, abs=2e-3)
    assert shares["sigmoid"] == pytest.approx((math.log1p(math.exp(6)) - math.log1p(math.exp(-14))) / 20, abs=2e-3)
    assert shares["constant:0.5"] == pytest.approx(0.5) and shares["none"] == 0
    assert shares["exp:5"] == pytest.approx(0.2, abs=5e-3)  # "about 20% of samples are swapped", as published
    png = Image.open(tmp_path / "p_t.png")
    assert png.mode == "P" and png.size[0] > 500  # a palette PNG


def write_log(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_log_curves_beside_the_log_without_all_zero_keys(tmp_path):
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    records = [
        dict(step=s, loss=1 / s, loss_kd_out=0.5 / s, loss_kd_feat=0.5 / s, loss_task=0.0, loss_rel=0.0)
        | dict(rc_swap_rate=0.2, lr=1e-4, grad_norm=1.0 + s / 100, step_time=0.1)
        for s in range(10, 110, 10)
    ]
    write_log(log, records, tail='{"step": 110, "loss": 0.0')  # a last line cut short by a kill
    drawn = figures.main(["log", str(log)])
    assert drawn == ["loss", "loss_kd_out", "loss_kd_feat", "rc_swap_rate", "grad_norm", "lr"]  # no all-zero keys
    assert Image.open(tmp_path / "run" / "log.png").size[1] > 4 * 150  # four panels: losses, swap rate, norm, lr
    write_log(log, [dict(step=s, loss=1.0, rc_swap_rate=0.0) for s in (1, 2)])  # an output-KD-free run: no swap rate
    assert figures.main(["log", str(log), "--png", str(tmp_path / "other.png")]) == ["loss"]
    assert (tmp_path / "other.png").is_file()


def test_log_without_records_and_bad_usage_are_one_line_errors(tmp_path):
    log = tmp_path / "log.jsonl"
    write_log(log, [{"step": 1, "loss": 0.0}], tail="not json\n")
    for argv in (["log", str(log)], ["log"], ["p_t", str(log)], ["p_t", "--seed", "1"], ["nothing"]):
        with pytest.raises(SystemExit) as e:
            figures.main(argv)
        one_line_error(e)


@pytest.mark.skipif(
    not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(), reason="no MNIST test split in RANDCOND_MNIST_DIR"
)
def test_quick_condition_influence(tmp_path, capsys):
    """The quick mode: a tiny toy teacher and judge (trained into --out), 16 held-out digits denoised from 3 noise
    levels; the table has a share per t, an output is never both digits, and the console names the cross-over."""
    png, out = tmp_path / "influence.png", tmp_path / "toy"
    argv = ["influence", "--png", str(png), "--preset", "quick", "--data-dir", str(MNIST_DIR), "--out", str(out)]
    table = figures.main(argv + ["--threads", "1"])
    assert table["t"] == [100, 500, 900] and table["images"] == 16
    assert len(table["source"]) == len(table["condition"]) == 3
    assert all(0 <= s and 0 <= c and s + c <= 1 for s, c in zip(table["source"], table["condition"]))
    assert table["crossover_t"] is None or table["crossover_t"] in table["t"]
    if table["crossover_t"] is not None:  # the first t where the condition's share is larger than x_0's
        i = table["t"].index(table["crossover_t"])
        assert table["condition"][i] > table["source"][i]
        assert all(c <= s for s, c in zip(table["source"][:i], table["condition"][:i]))
    assert f"t = {table['crossover_t']}" in capsys.readouterr().out
    assert Image.open(png).mode == "P" and (out / "teacher.safetensors").is_file()  # the toy's checksummed teacher
