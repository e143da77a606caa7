# ruff: noqa: F811 -- the fixtures imported from test_train are requested by name as test arguments
"""train.py at its edges: Ctrl-C and preemption, damaged checkpoints, a second run in one folder, a cache met with
another list, flags out of range, unreadable inputs, a teacher that cannot be had, errors under torchrun, library
warnings. Each case ends in one `error:` line with nothing good deleted or overwritten, or in an exact recovery."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_train import ENV, ROOT, cache, cmd, error_of, one_thread, run_inproc, texts  # noqa: F401 (module fixtures)

import train

UNET = "unet/diffusion_pytorch_model.safetensors"


def flip_bytes(path, n=64):
    """Damage a file as a bad disk or copy would: n bytes in the middle inverted, the size unchanged."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


def names(folder):
    return sorted(p.name for p in folder.iterdir())


# -----------------------------------------------------------------------------
# Ctrl-C and preemption: stop after the step, save, resume exactly

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
RUN = ["--student", "bk_small", "--checkpoint-every", "100", "--max-steps"]  # steps follow


def interrupt(argv, out, sig, group=False) -> tuple[int, str, str]:
    """Start argv, send sig once steps are running (the log has a line), return (status, stdout, stderr). group:
    to the whole process group, as a terminal's Ctrl-C; else to the process started (torchrun or train.py)."""
    proc = subprocess.Popen(
        argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.time() + 240
    while not (out / "log.jsonl").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=240)
    return proc.returncode, stdout, stderr


def stopped_at(out, stdout) -> int:
    """The step the run says it stopped at, checked against the checkpoint and the log it left."""
    step = int(stdout.strip().splitlines()[-1].removeprefix("interrupted at step ").split(";")[0])
    assert stdout.strip().splitlines()[-1] == f"interrupted at step {step}; continue with --resume"
    assert train.checkpoint_problem(out / "checkpoints" / f"step-{step:07d}.pt") is None  # intact, checksummed
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == step
    assert not (out / "unet").exists()
    return step


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_saves_and_the_resumed_run_is_exact(tiny_sd, cache, tmp_path, sig, status):
    run_inproc(tiny_sd, cache, tmp_path / "full", *RUN, "6")
    cut = tmp_path / "cut"
    code, stdout, stderr = interrupt(cmd(tiny_sd, cache, cut, *RUN, "1000"), cut, sig)
    assert code == status and "Traceback" not in stderr, stderr[-3000:]
    assert stopped_at(cut, stdout) < 6
    run_inproc(tiny_sd, cache, cut, *RUN, "6", "--resume")
    a, b = (load_file(d / UNET) for d in (tmp_path / "full", cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def ddp_full(tiny_sd, cache, tmp_path_factory):
    """An uninterrupted 2-process run of 6 steps."""
    out = tmp_path_factory.mktemp("ddp") / "full"
    subprocess.run(TORCHRUN + cmd(tiny_sd, cache, out, *RUN, "6")[1:], env=ENV, check=True, capture_output=True)
    return load_file(out / UNET)


@pytest.mark.slow
@pytest.mark.parametrize("sig, group", [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["ctrl-c", "sigterm"])
def test_under_torchrun_every_rank_stops_after_one_step_and_the_resume_is_exact(
    tiny_sd, cache, tmp_path, ddp_full, sig, group
):
    # a terminal's Ctrl-C reaches torchrun and both ranks, and torchrun forwards it again; a scheduler's SIGTERM
    # goes to torchrun, which forwards it
    cut = tmp_path / "cut"
    code, stdout, stderr = interrupt(TORCHRUN + cmd(tiny_sd, cache, cut, *RUN, "1000")[1:], cut, sig, group)
    assert code != 0 and "SignalException" in stderr  # torchrun's own report of the signal it got
    assert stdout.count("interrupted at step") == 1 and stopped_at(cut, stdout) < 6
    argv = TORCHRUN + cmd(tiny_sd, cache, cut, *RUN, "6", "--resume")[1:]
    subprocess.run(argv, env=ENV, check=True, capture_output=True, timeout=300)
    resumed = load_file(cut / UNET)
    assert all(torch.equal(ddp_full[k], resumed[k]) for k in ddp_full)


# -----------------------------------------------------------------------------
# checkpoints


def test_a_damaged_latest_checkpoint_is_named_skipped_and_the_run_resumes_exactly(tiny_sd, cache, tmp_path, capsys):
    out = tmp_path / "o"
    flags = ["--student", "bk_small", "--checkpoint-every", "2", "--max-steps", "4"]
    run_inproc(tiny_sd, cache, out, *flags)
    uninterrupted = load_file(out / UNET)
    flip_bytes(out / "checkpoints" / "step-0000004.pt")
    capsys.readouterr()
    run_inproc(tiny_sd, cache, out, *flags, "--resume", "--keep-checkpoints", "1")
    said = capsys.readouterr().out
    assert "step-0000004.pt is damaged (its bytes do not match its sha256 checksum)" in said
    assert "resumed from" in said and "step-0000002.pt at step 2" in said
    again = load_file(out / UNET)
    assert all(torch.equal(uninterrupted[k], again[k]) for k in uninterrupted)
    assert names(out / "checkpoints") == ["step-0000004.pt", "step-0000004.pt.json"]  # rewritten, intact
    assert train.checkpoint_problem(out / "checkpoints" / "step-0000004.pt") is None


def test_rotation_keeps_the_newest_intact_checkpoint_when_a_newer_one_is_damaged(tiny_sd, cache, tmp_path):
    out = tmp_path / "o"
    flags = ["--student", "bk_small", "--lambda-feat", "0", "--checkpoint-every", "2"]
    run_inproc(tiny_sd, cache, out, *flags, "--max-steps", "6", "--keep-checkpoints", "3")
    flip_bytes(out / "checkpoints" / "step-0000006.pt")
    run_inproc(tiny_sd, cache, out, *flags, "--max-steps", "5", "--keep-checkpoints", "1", "--resume")
    # the damaged step 6 is neither counted nor deleted; step 5, the newest intact one, is kept
    assert names(out / "checkpoints") == [
        "step-0000005.pt",
        "step-0000005.pt.json",
        "step-0000006.pt",
        "step-0000006.pt.json",
    ]
    assert train.checkpoint_problem(out / "checkpoints" / "step-0000005.pt") is None


def test_a_truncated_checkpoint_named_on_the_command_line_is_refused(tiny_sd, cache, tmp_path):
    out = tmp_path / "o"
    run_inproc(tiny_sd, cache, out, "--lambda-feat", "0", "--max-steps", "1", "--no-ema")
    ckpt = out / "checkpoints" / "step-0000001.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = names(out)
    msg = error_of(tiny_sd, cache, out, "--lambda-feat", "0", "--max-steps", "2", "--no-ema", "--resume", str(ckpt))
    assert str(ckpt) in msg and "truncated" in msg
    assert names(out) == before and ckpt.is_file()


def test_no_intact_checkpoint_stops_the_resume(tiny_sd, cache, tmp_path):
    out = tmp_path / "o"
    run_inproc(tiny_sd, cache, out, "--lambda-feat", "0", "--max-steps", "1", "--no-ema")
    flip_bytes(out / "checkpoints" / "step-0000001.pt")
    msg = error_of(tiny_sd, cache, out, "--lambda-feat", "0", "--max-steps", "2", "--no-ema", "--resume")
    assert "no intact checkpoint" in msg
    assert (out / "checkpoints" / "step-0000001.pt").is_file()


def test_a_checkpoint_of_another_student_batch_size_or_world_size_is_refused(tiny_sd, cache, tmp_path):
    out = tmp_path / "o"
    run_inproc(tiny_sd, cache, out, "--student", "bk_small", "--lambda-feat", "0", "--max-steps", "1")
    resume = ["--lambda-feat", "0", "--max-steps", "2", "--resume"]
    assert "with --student bk_small" in error_of(tiny_sd, cache, out, "--student", "bk_base", *resume)
    msg = error_of(tiny_sd, cache, out, "--student", "bk_small", "--batch-size", "1", *resume)
    assert "with --batch-size 2, this run has 1" in msg
    side = out / "checkpoints" / "step-0000001.pt.json"  # as written by a 2-process run
    side.write_text(json.dumps({**json.loads(side.read_text()), "processes": 2}))
    assert "with processes 2, this run has 1" in error_of(tiny_sd, cache, out, "--student", "bk_small", *resume)


# -----------------------------------------------------------------------------
# the latent cache


def test_a_built_cache_met_with_other_prompts_is_refused(tiny_sd, cache, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("a dog in the snow\na boat on the sea\n")
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    msg = error_of(tiny_sd, cache, tmp_path / "o", "--prompts", str(other), "--shard-size", "3", "--max-steps", "1")
    assert "different --prompts/--images list" in msg and "drop --prompts/--images" in msg
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before


def test_a_half_built_cache_met_with_other_prompts_is_refused(tiny_sd, texts, tmp_path):
    data = tmp_path / "data"
    run_inproc(tiny_sd, data, tmp_path / "o", "--prompts", str(texts[0]), "--shard-size", "3", "--max-steps", "0")
    assert not (data / "build.json").exists()  # a finished cache has one record, meta.json
    (data / "meta.json").rename(data / "build.json")  # as if the build had died: its record, with the same keys
    (data / "latents-00002.npy").unlink()
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    msg = error_of(tiny_sd, data, tmp_path / "o", "--prompts", str(texts[1]), "--shard-size", "3", "--max-steps", "0")
    assert "different --prompts/--images list" in msg and "delete it" in msg
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before  # no shard of the other list mixed in
    msg = error_of(tiny_sd, data, tmp_path / "o", "--prompts", str(texts[0]), "--shard-size", "2", "--max-steps", "0")
    assert "different --shard-size" in msg


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_shard_is_named_with_how_to_rebuild_it(tiny_sd, cache, texts, tmp_path, damage):
    data = tmp_path / "data"
    shutil.copytree(cache, data)
    shard = data / "latents-00001.npy"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:200])
    else:
        shard.unlink()
    msg = error_of(tiny_sd, data, tmp_path / "o", "--max-steps", "1")
    assert "shard 1 is missing or damaged" in msg and "delete latents-00001.npy and meta.json" in msg
    # doing what it says rebuilds exactly the shard that was built before
    shard.unlink(missing_ok=True)
    (data / "meta.json").unlink()
    run_inproc(tiny_sd, data, tmp_path / "o", "--prompts", str(texts[0]), "--shard-size", "3", "--max-steps", "0")
    assert shard.read_bytes() == (cache / "latents-00001.npy").read_bytes()


def test_an_unreadable_cache_record_is_named_and_its_shards_are_kept(tiny_sd, cache, texts, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(cache, data)
    (data / "meta.json").write_text('{"source": "prom')  # cut by a full disk
    shards = {p.name: p.read_bytes() for p in data.glob("latents-*.npy")}
    msg = error_of(tiny_sd, data, tmp_path / "o", "--prompts", str(texts[0]), "--shard-size", "3", "--max-steps", "0")
    assert "meta.json is unreadable" in msg and "delete it" in msg
    (data / "meta.json").unlink()  # doing what it says finishes the cache from the shards on disk
    run_inproc(tiny_sd, data, tmp_path / "o", "--prompts", str(texts[0]), "--shard-size", "3", "--max-steps", "0")
    assert {p.name: p.read_bytes() for p in data.glob("latents-*.npy")} == shards
    assert json.loads((data / "meta.json").read_text()) == json.loads((cache / "meta.json").read_text())


# -----------------------------------------------------------------------------
# flags and inputs, checked before any slow work


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--max-steps", "-5", "--max-steps: -5 is not at least 0"),
        ("--batch-size", "0", "--batch-size: 0 is not at least 1"),
        ("--log-every", "0", "--log-every: 0 is not at least 1"),
        ("--checkpoint-every", "0", "--checkpoint-every: 0 is not at least 1"),
        ("--lr", "-0.001", "--lr: -0.001 is not at least 0"),
        ("--lr", "nan", "--lr: nan is not at least 0"),
        ("--null-prob", "1.5", "--null-prob: 1.5 is not in [0, 1]"),
        ("--batch-size", "two", "--batch-size: invalid int value: 'two'"),
    ],
)
def test_counts_and_rates_out_of_range_are_refused_before_anything_is_written(tmp_path, flag, value, expected):
    r = subprocess.run(
        cmd("no-teacher-needed", tmp_path / "data", tmp_path / "out", flag, value),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and r.stderr.strip() == f"error: argument {expected}"
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


def test_a_prompt_file_that_is_not_utf8_is_named_with_its_line(tiny_sd, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a cat\na caf\u00e9\n".encode() + "a na\u00efve dog\n".encode("latin-1"))
    msg = error_of(tiny_sd, tmp_path / "data", tmp_path / "o", "--prompts", str(prompts))
    assert "line 3 is not UTF-8" in msg
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "metadata, text, bad_line",
    [
        ("metadata.jsonl", '{"file_name": "0.png", "text": "a cat"}\n{"file_name": "1.png", "text": "a dog"\n', 2),
        ("metadata.jsonl", '{"file_name": "0.png", "text": "a cat"}\n\n{"file_name": "1.png"}\n', 3),
        ("metadata.csv", "file_name,text\n0.png,a cat\n1.png\n", 3),
    ],
)
def test_image_metadata_that_does_not_parse_is_named_with_its_line(tiny_sd, tmp_path, metadata, text, bad_line):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / metadata).write_text(text)
    msg = error_of(tiny_sd, tmp_path / "data", tmp_path / "o", "--images", str(images))
    assert f"metadata line {bad_line} is not a record with a file_name and a text" in msg


@pytest.mark.parametrize("flag", ["--output-dir", "--data"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_the_cache_build(tiny_sd, texts, tmp_path, flag):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a folder cannot be made under a file, even by root
    data, out = tmp_path / "data", tmp_path / "out"
    data, out = (data, blocker / "out") if flag == "--output-dir" else (blocker / "data", out)
    msg = error_of(tiny_sd, data, out, "--prompts", str(texts[0]))
    assert f"{flag} {blocker}" in msg and "is not a writable folder" in msg
    assert not (tmp_path / "data").exists()


# -----------------------------------------------------------------------------
# the console


def test_each_library_warning_shows_at_most_once(tiny_sd, cache, tmp_path):
    extra = ["--max-steps", "2", "--validate-every", "1", "--validation-steps", "2", "--lambda-feat", "0"]
    r = subprocess.run(cmd(tiny_sd, cache, tmp_path / "o", *extra), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    # progress bars redraw with \r; every other line of some length is (part of) a message
    lines = [
        line for line in r.stderr.splitlines() if len(line.strip()) > 20 and "\r" not in line and "it/s]" not in line
    ]
    assert len(lines) == len(set(lines)), lines
    assert "truncated because CLIP" not in r.stderr and "Token indices sequence length" not in r.stderr
    assert "accelerate" not in r.stderr  # a requirement: diffusers' notice of its absence does not show


def test_a_student_config_that_does_not_parse_is_refused(tiny_sd, cache, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    msg = error_of(tiny_sd, cache, tmp_path / "o", "--student", str(bad), "--max-steps", "1")
    assert f"--student {bad}: not a readable UNet config.json" in msg


@pytest.mark.slow
def test_a_config_error_under_torchrun_is_printed_once(tiny_sd, cache, tmp_path):
    r = subprocess.run(
        TORCHRUN + cmd(tiny_sd, cache, tmp_path / "o", "--student", "bk_huge")[1:],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    said = r.stdout + r.stderr
    assert r.returncode == 1 and said.count("error: unknown --student 'bk_huge'") == 1
    assert "ChildFailedError" in said and "exitcode  : 1" in said  # torchrun's report follows; no rank was killed
    assert not (tmp_path / "o").exists()


# -----------------------------------------------------------------------------
# one run per folder; what a run records and says at its end; the tiny-model helper's command line


def test_a_new_run_in_a_folder_that_holds_one_is_refused_unless_overwrite(tiny_sd, cache, tmp_path):
    out = tmp_path / "o"
    flags = ["--lambda-feat", "0", "--no-ema", "--checkpoint-every", "1"]
    run_inproc(tiny_sd, cache, out, *flags, "--max-steps", "2")
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} | {
        "log": (out / "log.jsonl").read_bytes()
    }
    msg = error_of(tiny_sd, cache, out, *flags, "--max-steps", "1")
    assert f"{out} holds a run" in msg and "--resume" in msg and "new --output-dir" in msg
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} | {
        "log": (out / "log.jsonl").read_bytes()
    } == before
    run_inproc(tiny_sd, cache, out, *flags, "--max-steps", "1", "--overwrite")
    assert names(out / "checkpoints") == ["step-0000001.pt", "step-0000001.pt.json"]  # step 2 of the old run went
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]


def test_args_json_records_what_ran_and_threads_sets_torchs_threads(tiny_sd, cache, tmp_path):
    torch.set_num_threads(2)  # as torch's choice would be on this machine; the run asks for 1
    run_inproc(tiny_sd, cache, tmp_path / "o", "--max-steps", "1", "--lambda-feat", "0", "--threads", "1")
    assert torch.get_num_threads() == 1
    record = json.loads((tmp_path / "o" / "args.json").read_text())
    assert record["ran"] == {"device": "cpu", "processes": 1, "threads": 1, "precision": "fp32"}
    assert record["mixed_precision"] == "fp16"  # the flag as given; "ran" says what a CPU made of it


def test_training_ends_with_a_summary_and_the_command_that_scores_it(tiny_sd, cache, tmp_path, capsys):
    out = tmp_path / "o"
    run_inproc(tiny_sd, cache, out, "--max-steps", "2", "--lambda-feat", "0", "--no-ema")
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    done, where, command = capsys.readouterr().out.strip().splitlines()[-3:]
    assert done.startswith("done: step 2, 0:00:") and f"| kd_out {last['loss_kd_out']:.4f}" in done
    assert where.startswith(f"student pipeline in {out};")
    assert command == (
        f"python evaluate.py --model {out} --resolution 64 --prompts PROMPTS --ref REF.npz --out-dir {out}_eval"
    )
    usage = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--help"], env=ENV, capture_output=True, text=True
    )
    assert all(f"[{flag} " in usage.stdout for flag in ("--model", "--resolution", "--prompts", "--ref", "--out-dir"))


def test_a_failed_run_leaves_no_empty_folder_it_made(tiny_sd, texts, tmp_path):
    no_unet = tmp_path / "no_unet"
    (no_unet / "vae").mkdir(parents=True)
    kept = tmp_path / "kept"
    kept.mkdir()  # there before the run: stays, even empty
    error_of(no_unet, tmp_path / "new" / "data", kept, "--prompts", str(texts[0]))
    assert not (tmp_path / "new").exists() and kept.is_dir()


def test_the_tiny_sd_helper_takes_its_folder_as_a_required_argument(tmp_path):
    helper = [sys.executable, str(ROOT / "tests" / "tiny_sd.py")]
    r = subprocess.run([*helper, "--help"], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0 and "folder" in r.stdout
    r = subprocess.run(helper, cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "required: folder" in r.stderr
    assert list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# a teacher that is neither a folder here nor to be had from the hub, said before any slow work


@pytest.mark.parametrize(
    "teacher, expected",
    [
        ("runs/tiny_sdd", "--teacher runs/tiny_sdd: folder not found"),  # beside a folder runs/: a path
        ("./tiny_sdd", "--teacher ./tiny_sdd: folder not found"),
        ("runs/a/b", "--teacher runs/a/b: folder not found"),
        (
            "CompVis/no-such-model",
            "--teacher CompVis/no-such-model: not a folder here, not in the local hub cache, and the hub is offline"
            " (HF_HUB_OFFLINE=1)",
        ),
    ],
)
def test_a_teacher_that_cannot_be_had_is_named_before_anything_is_written(tmp_path, monkeypatch, teacher, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert error_of(teacher, tmp_path / "data", tmp_path / "o", "--prompts", "never-read.txt") == f"error: {expected}"
    assert names(tmp_path) == ["runs"]


def test_an_unreachable_hub_is_named_in_one_line(tmp_path):
    env = {**ENV, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}  # a closed port: refused at once
    r = subprocess.run(
        cmd("CompVis/no-such-model", tmp_path / "d", tmp_path / "o"), env=env, capture_output=True, text=True
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr and "local_files_only" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --teacher CompVis/no-such-model: not a folder here, not in the local hub cache,")
    assert "and the hub is unreachable (" in line and not (tmp_path / "d").exists()
