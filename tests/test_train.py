"""train.py on a tiny SD-v1-shaped teacher: students, latent cache, training on 1 and 2 processes,
kill-and-resume, export, and every bad input the trainer promises to reject cleanly."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a red cat on the sea",
    "a blue car in the city",
    "a photo of a dog with a man",
    "a painting of a small house in the forest",
    "a big tree on a mountain at night",
    "a white bird in the sky",
    "a green field with flowers",
    "a woman and a child on the street",
]
# one thread per process: the tiny models are all overhead, and the CI machine has two shared cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
FAST = [
    "--resolution",
    "64",
    "--gen-steps",
    "2",
    "--batch-size",
    "2",
    "--total-batch-size",
    "4",
    "--validate-every",
    "0",
    "--log-every",
    "1",
    "--no-gradient-checkpointing",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # module scope: it must also cover the module's cache fixture
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("texts")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (d / "pool.txt").write_text("a horse in the snow\na boat on the river\nthe moon over the city\n")
    return d / "prompts.txt", d / "pool.txt"


@pytest.fixture(scope="module")
def cache(tiny_sd, texts, tmp_path_factory) -> Path:
    """An image-free latent cache built by train.py itself (--max-steps 0 builds and stops)."""
    data = tmp_path_factory.mktemp("cache") / "data"
    run_inproc(
        tiny_sd,
        data,
        tmp_path_factory.mktemp("out0"),
        "--prompts",
        str(texts[0]),
        "--shard-size",
        "3",
        "--max-steps",
        "0",
    )
    return data


def run_inproc(teacher, data, out, *extra):
    args = ["--teacher", str(teacher), "--data", str(data), "--output-dir", str(out), *FAST, *extra]
    train.train(train.parse_args(args))


def cmd(teacher, data, out, *extra) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--teacher",
        str(teacher),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        *FAST,
        *extra,
    ]


def error_of(teacher, data, out, *extra) -> str:
    with pytest.raises(SystemExit) as e:
        run_inproc(teacher, data, out, *extra)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


# -----------------------------------------------------------------------------
# students

SD14_UNET = {  # CompVis/stable-diffusion-v1-4 unet/config.json
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# UNet parameters in billions as published (BK-SDM / the paper); c_* are given as approximate there
PUBLISHED = {
    "teacher": 0.86,
    "bk_base": 0.58,
    "bk_small": 0.49,
    "bk_tiny": 0.33,
    "c_base": 0.55,
    "c_small": 0.43,
    "c_tiny": 0.31,
    "c_micro": 0.22,
}


SD_STUDENTS = [name for name in train.STUDENTS if name not in train.KOALA]  # KOALA: tests/test_sdxl.py


def meta_unet(cfg):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # shapes only: an 860M model in no memory and no time
        return UNet2DConditionModel.from_config(cfg)


@pytest.mark.parametrize("name", SD_STUDENTS)
def test_student_sizes_match_the_published_ones_at_sd14_scale(name):
    n = sum(p.numel() for p in meta_unet(train.student_config(SD14_UNET, name)).parameters()) / 1e9
    tol = 0.02 if name.startswith("bk_") else 0.05
    assert abs(n - PUBLISHED[name]) <= tol, (name, n)
    assert abs(sum(p.numel() for p in meta_unet(SD14_UNET).parameters()) / 1e9 - PUBLISHED["teacher"]) < 0.01


def test_width_students_of_sd2_keep_heads_that_divide():
    sd2 = {
        **SD14_UNET,
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "sample_size": 96,
    }
    for name in ("c_base", "c_small", "c_tiny", "c_micro"):
        cfg = train.student_config(sd2, name)
        assert all(w % h == 0 for w, h in zip(cfg["block_out_channels"], cfg["attention_head_dim"]))
        meta_unet(cfg)  # builds
    tiny = train.student_config(sd2, "bk_tiny")
    assert tiny["attention_head_dim"] == [5, 10, 20] and tiny["block_out_channels"] == [320, 640, 1280]


# BK-SDM's teacher init written out for an SD-v1-shaped teacher: student module <- teacher module.
# Everything not listed (down path, mid block, conv_in/out, time embedding) keeps its own name.
UP_PATH = {
    "bk_base": {
        "up_blocks.0.resnets.0": "up_blocks.0.resnets.0",
        "up_blocks.0.resnets.1": "up_blocks.0.resnets.2",
        "up_blocks.0.upsamplers.0": "up_blocks.0.upsamplers.0",
        "up_blocks.1.resnets.0": "up_blocks.1.resnets.0",
        "up_blocks.1.resnets.1": "up_blocks.1.resnets.2",
        "up_blocks.1.attentions.0": "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1": "up_blocks.1.attentions.2",
        "up_blocks.1.upsamplers.0": "up_blocks.1.upsamplers.0",
        "up_blocks.2.resnets.0": "up_blocks.2.resnets.0",
        "up_blocks.2.resnets.1": "up_blocks.2.resnets.2",
        "up_blocks.2.attentions.0": "up_blocks.2.attentions.0",
        "up_blocks.2.attentions.1": "up_blocks.2.attentions.2",
        "up_blocks.2.upsamplers.0": "up_blocks.2.upsamplers.0",
        "up_blocks.3.resnets.0": "up_blocks.3.resnets.0",
        "up_blocks.3.resnets.1": "up_blocks.3.resnets.2",
        "up_blocks.3.attentions.0": "up_blocks.3.attentions.0",
        "up_blocks.3.attentions.1": "up_blocks.3.attentions.2",
    },
    "bk_tiny": {  # the outermost up stage is gone: student up stage k is the teacher's k + 1
        "up_blocks.0.resnets.0": "up_blocks.1.resnets.0",
        "up_blocks.0.resnets.1": "up_blocks.1.resnets.2",
        "up_blocks.0.attentions.0": "up_blocks.1.attentions.0",
        "up_blocks.0.attentions.1": "up_blocks.1.attentions.2",
        "up_blocks.0.upsamplers.0": "up_blocks.1.upsamplers.0",
        "up_blocks.1.resnets.0": "up_blocks.2.resnets.0",
        "up_blocks.1.resnets.1": "up_blocks.2.resnets.2",
        "up_blocks.1.attentions.0": "up_blocks.2.attentions.0",
        "up_blocks.1.attentions.1": "up_blocks.2.attentions.2",
        "up_blocks.1.upsamplers.0": "up_blocks.2.upsamplers.0",
        "up_blocks.2.resnets.0": "up_blocks.3.resnets.0",
        "up_blocks.2.resnets.1": "up_blocks.3.resnets.2",
        "up_blocks.2.attentions.0": "up_blocks.3.attentions.0",
        "up_blocks.2.attentions.1": "up_blocks.3.attentions.2",
    },
}
UP_PATH["bk_small"] = UP_PATH["bk_base"]
C_LAYERS = [  # the official trainer's 9 feature-KD layers of the C-series
    "up_blocks.0.upsamplers.0.conv",
    "up_blocks.1.upsamplers.0.conv",
    "up_blocks.2.upsamplers.0.conv",
    "up_blocks.3.attentions.2.proj_out",
    "mid_block.attentions.0.proj_out",
    "down_blocks.0.downsamplers.0.conv",
    "down_blocks.1.downsamplers.0.conv",
    "down_blocks.2.downsamplers.0.conv",
    "down_blocks.3.resnets.1.conv2",
]


def teacher_tensor(student_tensor: str, student: str) -> str:
    for s, t in UP_PATH[student].items():
        if student_tensor.startswith(s + "."):
            return t + student_tensor[len(s) :]
    assert not student_tensor.startswith("up_blocks."), f"the table misses {student_tensor}"
    return student_tensor


@pytest.mark.parametrize("name", SD_STUDENTS)
def test_students_of_the_tiny_teacher(tiny_sd, name):
    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    student, layers = train.build_student(teacher, name, None)
    n_t, n_s = (sum(p.numel() for p in m.parameters()) for m in (teacher, student))
    assert 0.2 * n_t < n_s < n_t
    x, t, ehs = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 16, 32)
    assert student(x, t, ehs).sample.shape == x.shape
    t_state, s_state = teacher.state_dict(), student.state_dict()
    if name.startswith("bk_"):
        assert all(len(b.resnets) == 1 for b in student.down_blocks)
        assert all(len(b.resnets) == 2 for b in student.up_blocks)
        assert (student.mid_block is None) == (name != "bk_base")
        assert len(student.down_blocks) == (3 if name == "bk_tiny" else 4)
        for k, v in s_state.items():  # every student tensor is the teacher tensor the table names
            assert torch.equal(v, t_state[teacher_tensor(k, name)]), k
        stages = [f"{path}_blocks.{i}" for path in ("down", "up") for i in range(4)]
        assert layers == (train.BK_TINY_LAYERS if name == "bk_tiny" else {s: s for s in stages})
    else:
        scale = train.C_WIDTHS[name] / 320
        assert all(
            abs(s - t * scale) <= 8
            for s, t in zip(student.config.block_out_channels, teacher.config.block_out_channels)
        )
        assert not torch.equal(s_state["conv_in.weight"][:1], t_state["conv_in.weight"][:1, :, :, :])
        with pytest.raises(SystemExit, match="--init random"):
            train.build_student(teacher, name, "teacher")
        assert layers == {s: s for s in C_LAYERS}
    # every hooked layer exists in both models
    for s, t in layers.items():
        student.get_submodule(s), teacher.get_submodule(t)


def test_student_starts_from_the_full_precision_teacher_when_the_teacher_runs_in_bf16(tiny_sd):
    from diffusers import UNet2DConditionModel

    pipe, student, _ = train.load_models(str(tiny_sd), "bk_base", None, torch.bfloat16, torch.device("cpu"))
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    fp32 = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    rounded = 0
    for k, v in student.state_dict().items():
        expected = fp32[teacher_tensor(k, "bk_base")]
        assert v.dtype == torch.float32 and torch.equal(v, expected), k
        rounded += not torch.equal(expected, expected.bfloat16().float())
    assert rounded > 0  # a copy of the bf16 teacher would have differed


def test_feature_kd_layers_give_matching_shapes_for_bk_tiny(tiny_sd):
    from diffusers import UNet2DConditionModel

    from randcond import FeatureDistiller

    teacher = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    student, layers = train.build_student(teacher, "bk_tiny", None)
    distiller = FeatureDistiller(teacher, student, layers)
    distiller.probe(torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.randn(2, 16, 32))
    assert len(distiller.proj) == 0 and len(layers) == 6


# -----------------------------------------------------------------------------
# latent cache


def test_image_free_cache_holds_the_teachers_latents(tiny_sd, cache):
    from diffusers import StableDiffusionPipeline

    meta = json.loads((cache / "meta.json").read_text())
    assert meta["num_samples"] == 8 and meta["num_shards"] == 3 and meta["latent_shape"] == [4, 8, 8]
    assert sorted(p.name for p in cache.glob("latents-*.npy")) == [f"latents-0000{k}.npy" for k in range(3)]
    lc = train.LatentCache(cache)
    assert lc.captions == PROMPTS
    lat, caps = lc.get(np.array([5, 0, 7]))
    assert lat.shape == (3, 4, 8, 8) and caps == [PROMPTS[5], PROMPTS[0], PROMPTS[7]]
    # the stored latent is the teacher's own sample for that prompt and its fixed seed (seed + index)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        [PROMPTS[5]],
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(1234 + 5)],
        output_type="latent",
    ).images
    torch.testing.assert_close(lat[0].float(), ref[0], atol=2e-3, rtol=2e-3)
    assert (cache / "captions.txt").read_text().splitlines() == PROMPTS


def test_cache_build_resumes_keeping_finished_shards(tiny_sd, texts, tmp_path):
    data = tmp_path / "data"
    run_inproc(tiny_sd, data, tmp_path / "o", "--prompts", str(texts[0]), "--shard-size", "3", "--max-steps", "0")
    first = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in data.glob("latents-*.npy")}
    (data / "meta.json").unlink()  # as if the build died before its end ...
    (data / "latents-00001.npy").unlink()  # ... with one shard unfinished
    run_inproc(tiny_sd, data, tmp_path / "o", "--prompts", str(texts[0]), "--shard-size", "3", "--max-steps", "0")
    for name in ("latents-00000.npy", "latents-00002.npy"):
        assert (data / name).stat().st_mtime_ns == first[name][0]  # kept, not rewritten
    assert (data / "latents-00001.npy").read_bytes() == first["latents-00001.npy"][1]  # rebuilt identically


def test_cache_from_captioned_images(tiny_sd, tmp_path):
    from diffusers import AutoencoderKL
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate([(96, 64), (64, 80), (64, 64)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": PROMPTS[i]})
    (imgs / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run_inproc(tiny_sd, tmp_path / "data", tmp_path / "o", "--images", str(imgs), "--max-steps", "0")
    lc = train.LatentCache(tmp_path / "data")
    lat, caps = lc.get(np.arange(3))
    assert caps == PROMPTS[:3] and lat.shape == (3, 4, 8, 8)
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")  # image 2 is square: no crop, no resize
    x = torch.from_numpy(np.array(Image.open(imgs / "2.png"))).permute(2, 0, 1)[None].float() / 127.5 - 1
    ref = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(lat[2:].float(), ref, atol=2e-3, rtol=2e-3)


def test_sampler_splits_each_epoch_disjointly_by_global_rank():
    n, B, world = 50, 4, 3
    samplers = [train.ShardedSampler(n, B, rank, world, seed=7) for rank in range(world)]
    per_epoch = samplers[0].batches_per_epoch
    assert per_epoch == (n // world) // B
    for epoch in range(2):
        seen = [np.concatenate([s.batch(epoch * per_epoch + b) for b in range(per_epoch)]) for s in samplers]
        flat = np.concatenate(seen)
        assert len(set(flat.tolist())) == len(flat) == world * per_epoch * B  # disjoint across ranks
    fresh = train.ShardedSampler(n, B, 1, world, seed=7)  # a restarted process finds the same batch
    assert np.array_equal(fresh.batch(per_epoch + 1), samplers[1].batch(per_epoch + 1))
    assert not np.array_equal(samplers[0].batch(0), samplers[0].batch(per_epoch))  # a new order each epoch


# -----------------------------------------------------------------------------
# training, export


def test_train_one_process_with_projections_and_export(tiny_sd, cache, texts, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "out"
    run_inproc(
        tiny_sd,
        cache,
        out,
        "--student",
        "c_small",
        "--text-pool",
        str(texts[1]),
        "--max-steps",
        "3",
        "--lambda-task",
        "1",
        "--lambda-rel",
        "1",
        "--checkpoint-every",
        "2",
        "--validate-every",
        "3",
        "--validation-steps",
        "2",
        "--gradient-checkpointing",
    )
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    for key in ("loss_kd_out", "loss_kd_feat", "loss_task", "loss_rel"):
        assert all(r[key] > 0 and np.isfinite(r[key]) for r in log), key
    for r in log:  # the logged total is the weighted sum of the logged terms (lambdas all 1 here)
        assert r["loss"] == pytest.approx(
            r["loss_kd_out"] + r["loss_kd_feat"] + r["loss_task"] + r["loss_rel"], rel=1e-5
        )
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*.pt")) == ["step-0000002.pt", "step-0000003.pt"]
    assert (out / "samples" / "step-0000003.png").is_file()
    ckpt = torch.load(out / "checkpoints" / "step-0000003.pt", weights_only=True)
    assert any(k.startswith("distiller.proj.") for k in ckpt["model"])  # projections trained ...
    exported = load_file(out / "unet_no_ema" / "diffusion_pytorch_model.safetensors")
    assert not any("proj." in k and k.startswith("distiller") for k in exported)  # ... and dropped at export
    trained = {k[len("unet.") :]: v for k, v in ckpt["model"].items() if k.startswith("unet.")}
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in exported)
    init = UNet2DConditionModel.from_config(
        train.student_config(UNet2DConditionModel.load_config(tiny_sd / "unet"), "c_small")
    )
    assert init.state_dict().keys() == exported.keys()

    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.block_out_channels == init.config.block_out_channels
    image = pipe("a red cat", height=64, width=64, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    ema = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(ema[k], exported[k]) for k in ema)  # unet/ holds the EMA weights


@pytest.mark.parametrize(
    "flags, rate", [(["--no-random-conditioning"], 0.0), (["--rc-schedule", "constant", "--rc-lambda", "1"], 1.0)]
)
def test_random_conditioning_flags_reach_the_step(tiny_sd, cache, tmp_path, flags, rate):
    # p(t) = 0 and p(t) = 1 pin the logged swap rate exactly; lambda_feat 0 keeps the steps cheap
    run_inproc(tiny_sd, cache, tmp_path / "o", "--max-steps", "2", "--lambda-feat", "0", "--no-ema", *flags)
    log = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert [r["rc_swap_rate"] for r in log] == [rate, rate]


def test_rc_lambda_is_refused_where_p_t_does_not_read_it(tiny_sd, cache, tmp_path):
    for flags in (["--rc-schedule", "sigmoid"], ["--no-random-conditioning"]):
        msg = error_of(tiny_sd, cache, tmp_path / "o", *flags, "--rc-lambda", "3", "--max-steps", "1")
        assert "--rc-lambda is not read by this p(t)" in msg


def test_logged_grad_norm_is_the_mean_over_the_logging_window(tiny_sd, cache, tmp_path):
    common = ["--max-steps", "2", "--lambda-feat", "0", "--no-ema"]
    run_inproc(tiny_sd, cache, tmp_path / "each", *common, "--log-every", "1")
    run_inproc(tiny_sd, cache, tmp_path / "both", *common, "--log-every", "2")
    each, both = (
        [json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("each", "both")
    )
    assert len(each) == 2 and len(both) == 1 and each[0]["grad_norm"] != each[1]["grad_norm"]
    assert both[0]["grad_norm"] == pytest.approx((each[0]["grad_norm"] + each[1]["grad_norm"]) / 2, rel=1e-5)
    assert both[0]["loss"] == pytest.approx((each[0]["loss"] + each[1]["loss"]) / 2, rel=1e-5)


def test_bk_tiny_trains_with_its_shorter_feature_pairs(tiny_sd, cache, tmp_path):
    run_inproc(
        tiny_sd, cache, tmp_path / "o", "--student", "bk_tiny", "--max-steps", "2", "--lambda-rel", "1", "--no-ema"
    )
    log = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert all(r["loss_kd_feat"] > 0 and r["loss_rel"] > 0 for r in log)
    from diffusers import UNet2DConditionModel

    assert len(UNet2DConditionModel.from_pretrained(tmp_path / "o" / "unet").down_blocks) == 3


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--teacher",
        "--student",
        "--init",
        "--data",
        "--prompts",
        "--images",
        "--text-pool",
        "--random-conditioning",
        "--no-random-conditioning",
        "--rc-schedule",
        "--rc-lambda",
        "--null-prob",
        "--resolution",
        "--max-steps",
        "--batch-size",
        "--total-batch-size",
        "--lr",
        "--lambda-out",
        "--lambda-feat",
        "--lambda-task",
        "--lambda-rel",
        "--mixed-precision",
        "--gradient-checkpointing",
        "--ema",
        "--output-dir",
        "--checkpoint-every",
        "--resume",
        "--seed",
        "--validate-every",
        "--compile",
    ):
        assert flag in text, flag
    blocks = [" ".join(b.split()) for b in re.split(r"\n  (?=-)", text.split("options:")[1])]  # one per flag
    assert len(blocks) > 40 and "(default: None)" not in text and "(default: [])" not in text
    # every flag with a default shows it once; those without one (None, []) say nothing of it
    unshown = {b.split()[0] for b in blocks if b and "(default:" not in b}
    assert unshown == {
        "-h,",
        "--init",
        "--data",
        "--prompts",
        "--images",
        "--text-pool",
        "--resolution",
        "--rc-lambda",
        "--output-dir",
        "--resume",
    }
    for block in blocks:
        assert block.count("default") <= 1, block


def test_kill_and_resume_gives_the_uninterrupted_weights(tiny_sd, cache, texts, tmp_path):
    common = ["--student", "bk_small", "--text-pool", str(texts[1]), "--checkpoint-every", "2"]
    full = tmp_path / "full"
    run_inproc(tiny_sd, cache, full, *common, "--max-steps", "6")  # in this process: one start-up less

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        cmd(tiny_sd, cache, cut, *common, "--max-steps", "1000"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    # a checkpoint is complete once its checksum is beside it
    while not list((cut / "checkpoints").glob("step-*.pt.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = sorted((cut / "checkpoints").glob("step-*.pt"))
    assert kept and int(kept[-1].stem[5:]) < 6 and not (cut / "unet").exists()
    subprocess.run(
        cmd(tiny_sd, cache, cut, *common, "--max-steps", "6", "--resume"), env=ENV, check=True, capture_output=True
    )
    for sub in ("unet", "unet_no_ema"):
        a = load_file(full / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(cut / sub / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    steps = [json.loads(line)["step"] for line in (cut / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step once: the lines after the checkpoint were dropped on resume


@pytest.mark.slow
def test_compile_trains_as_eager_does_and_exports_a_plain_unet(tiny_sd, cache, tmp_path):
    """--compile with torch's default backend (inductor), under gradient checkpointing as by default."""
    from diffusers import UNet2DConditionModel

    common = ["--max-steps", "2", "--no-ema", "--gradient-checkpointing"]
    run_inproc(tiny_sd, cache, tmp_path / "eager", *common)
    argv = cmd(tiny_sd, cache, tmp_path / "compiled", *common, "--compile")  # its own process: dynamo state
    r = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = [
        [json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("eager", "compiled")
    ]
    assert len(logs[0]) == len(logs[1]) == 2
    for eager, compiled in zip(*logs):
        for term in ("loss", "loss_kd_out", "loss_kd_feat"):
            assert compiled[term] == pytest.approx(eager[term], rel=1e-3, abs=1e-6), term
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "compiled" / "unet")
    assert unet.config.layers_per_block == 1 and not unet.is_gradient_checkpointing


@pytest.mark.slow
def test_torchrun_two_processes_draw_apart_and_end_with_identical_weights(tiny_sd, cache, texts, tmp_path):
    out = tmp_path / "ddp"
    # each rank records what train.py drew in every micro-step (the real draws, passed through) and
    # saves what it trained (student and projections), so the test compares the ranks itself
    (tmp_path / "each_rank.py").write_text(
        "import json, os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from safetensors.torch import save_file\n"
        "import train\n"
        "draws, draw_batch = [], train.Trainer.draw_batch\n"
        "def recorded(self, micro_step):\n"
        "    b = draw_batch(self, micro_step)\n"
        "    draws.append(dict(step=micro_step, indices=b['indices'].tolist(), timesteps=b['timesteps'].tolist(),\n"
        "                      noise=b['noise'].flatten().tolist(), captions=b['captions']))\n"
        "    return b\n"
        "train.Trainer.draw_batch = recorded\n"
        "model = train.train(train.parse_args(sys.argv[1:]))\n"
        "state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}\n"
        f"save_file(state, {str(tmp_path)!r} + f'/rank{{os.environ[\"RANK\"]}}.safetensors')\n"
        f"open({str(tmp_path)!r} + f'/draws{{os.environ[\"RANK\"]}}.json', 'w').write(json.dumps(draws))\n"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # p(t) = 1: every caption is a pool draw (or the empty one), so the captions show the pool draws
    flags = ["--student", "c_tiny", "--text-pool", str(texts[1]), "--rc-schedule", "constant", "--rc-lambda", "1"]
    args = cmd(tiny_sd, cache, out, *flags, "--max-steps", "3", "--total-batch-size", "8", "--no-ema")[2:]
    r = subprocess.run(
        torchrun + [str(tmp_path / "each_rank.py")] + args, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes x batch 2 x 2 accumulation = 8" in r.stdout

    draws = [json.loads((tmp_path / f"draws{rank}.json").read_text()) for rank in (0, 1)]
    assert [d["step"] for d in draws[0]] == [d["step"] for d in draws[1]] == list(range(6))
    for a, b in zip(*draws):  # the same micro-step on the two ranks: nothing drawn twice
        assert not set(a["indices"]) & set(b["indices"])
        assert a["timesteps"] != b["timesteps"] and a["noise"] != b["noise"] and a["captions"] != b["captions"]
    # an epoch is 8 samples / (2 ranks x batch 2) = 2 micro-steps: together the ranks see the cache once
    for epoch in range(3):
        seen = [i for d in draws for step in d[2 * epoch : 2 * epoch + 2] for i in step["indices"]]
        assert sorted(seen) == list(range(8)), epoch

    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    projections = [k for k in rank0 if k.startswith("distiller.proj.")]
    assert projections and rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # DDP reduced every parameter, projections too
    exported = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], rank0["unet." + k]) for k in exported)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3] and all(np.isfinite(x["loss"]) for x in log)


def test_random_streams_never_repeat_within_a_run():
    # torch's CPU generator keeps 32 bits of its seed; the streams of 64 ranks x 2000 micro-steps are
    # numbered apart, where hashed seeds would already collide (birthday bound ~ 77K streams for 50%)
    seeds = [train.draw_generator(1234, r, 64, s).initial_seed() for r in range(64) for s in range(2000)]
    assert len(set(seeds)) == len(seeds) and max(seeds) < 2**32
    first = torch.rand(1, generator=train.draw_generator(1234, 3, 4, 10))
    assert torch.equal(first, torch.rand(1, generator=train.draw_generator(1234, 3, 4, 10)))  # replayed on resume
    assert train.draw_generator(1, 0, 1, 0).initial_seed() != train.draw_generator(0, 0, 1, 1).initial_seed()


def test_ema_follows_its_formula(tiny_sd, cache, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "ema"
    flags = ["--student", "bk_small", "--lambda-feat", "0", "--lr", "1e-2", "--ema-decay", "0.5"]
    run_inproc(tiny_sd, cache, out, *flags, "--max-steps", "3", "--checkpoint-every", "1", "--keep-checkpoints", "3")
    teacher = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    student, _ = train.build_student(teacher, "bk_small", None)
    names = [n for n, _ in student.named_parameters()]
    raw = [dict(student.named_parameters())]  # w_0: the teacher init
    for step in (1, 2, 3):
        ckpt = torch.load(out / "checkpoints" / f"step-{step:07d}.pt", weights_only=True)
        raw.append({n: ckpt["model"]["unet." + n] for n in names})
    # ema_0 = w_0; ema_{n+1} = d_n ema_n + (1 - d_n) w_{n+1}, d_n = min(0.5, (1 + n) / (10 + n))
    ema = {n: raw[0][n].detach().clone() for n in names}
    for n in range(3):
        d = min(0.5, (1 + n) / (10 + n))
        ema = {k: d * ema[k] + (1 - d) * raw[n + 1][k] for k in names}
    for k, got in zip(names, ckpt["ema"]):
        torch.testing.assert_close(got, ema[k], rtol=1e-5, atol=1e-6)
    assert max((ema[k] - raw[3][k]).abs().max() for k in names) > 1e-3  # far from the raw weights


# -----------------------------------------------------------------------------
# bad input: a one-line error naming what to change, and nothing already written is touched


def test_bad_inputs_give_one_line_errors(tiny_sd, cache, texts, tmp_path):
    out = tmp_path / "o"
    assert "unknown --student 'bk_huge'" in error_of(tiny_sd, cache, out, "--student", "bk_huge", "--max-steps", "1")
    no_unet = tmp_path / "no_unet"
    (no_unet / "vae").mkdir(parents=True)
    assert "not a loadable diffusers Stable Diffusion or SDXL pipeline" in error_of(
        no_unet, cache, out, "--max-steps", "1"
    )
    assert "pass --prompts FILE or --images DIR" in error_of(tiny_sd, tmp_path / "nodata", out)
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "has no prompt" in error_of(tiny_sd, tmp_path / "d2", out, "--prompts", str(tmp_path / "empty.txt"))
    assert "text pool file not found" in error_of(
        tiny_sd, cache, out, "--text-pool", str(tmp_path / "missing.txt"), "--max-steps", "1"
    )
    assert "text pool is empty" in error_of(
        tiny_sd, cache, out, "--text-pool", str(tmp_path / "empty.txt"), "--max-steps", "1"
    )
    msg = error_of(tiny_sd, cache, out, "--resolution", "128", "--max-steps", "1")
    assert "(4, 8, 8)" in msg and "(4, 16, 16)" in msg and "--resolution 64" in msg
    assert "not a multiple of --batch-size" in error_of(
        tiny_sd, cache, out, "--total-batch-size", "6", "--batch-size", "4"
    )
    assert "no intact checkpoint" in error_of(tiny_sd, cache, tmp_path / "fresh", "--resume", "--max-steps", "1")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "a cat"}))
    assert "1 listed images are missing" in error_of(tiny_sd, tmp_path / "d3", out, "--images", str(tmp_path / "imgs"))
    # a wrong student or pool file is reported before hours of cache building, not after
    prompts = str(texts[0])
    error_of(tiny_sd, tmp_path / "d4", out, "--prompts", prompts, "--student", "bk_huge")
    error_of(tiny_sd, tmp_path / "d4", out, "--prompts", prompts, "--text-pool", str(tmp_path / "missing.txt"))
    assert not (tmp_path / "d4").exists()
    before = sorted(p.name for p in cache.iterdir())
    assert json.loads((cache / "meta.json").read_text())["num_samples"] == 8 and before == sorted(
        p.name for p in cache.iterdir()
    )


def test_nan_loss_stops_with_an_error_and_keeps_the_checkpoints(tiny_sd, cache, tmp_path):
    out = tmp_path / "nan"
    # an absurd lr blows the weights up at the first update; the second step's loss is not finite
    msg = error_of(tiny_sd, cache, out, "--lr", "1e30", "--max-steps", "5", "--checkpoint-every", "1", "--no-ema")
    assert "loss is" in msg and "at step 2" in msg
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-0000001.pt", "step-0000001.pt.json"]  # written before the failure, no .tmp left
    assert torch.load(out / "checkpoints" / kept[0], weights_only=True)["step"] == 1
    assert not (out / "unet").exists()


def test_bad_input_exits_non_zero_without_a_traceback(tiny_sd, cache, tmp_path):
    r = subprocess.run(
        cmd(tiny_sd, cache, tmp_path / "o", "--student", "nope"), env=ENV, capture_output=True, text=True
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown --student 'nope'")


@pytest.mark.slow
def test_bench_train_step_prints_its_figures_as_json():
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "train_step.py"),
            "--warmup",
            "1",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--loader-samples",
            "128",
            "--threads",
            "1",
            "--json",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert figures["step_ratio"] == pytest.approx(figures["ours_step_s"] / figures["bare_step_s"])
    assert 0.3 < figures["step_ratio"] < 10 and 0.3 < figures["step_ratio_output_kd_only"] < 10
    # a memory-mapped batch read beats 2 x 64 file opens and unpicklings by far, even on a busy machine
    assert figures["loader_ratio"] > 2
    assert "step ratio (target <= 1.10)" in r.stdout


def test_prompt_files_split_on_newlines_only(tmp_path):
    # U+2028 and U+0085 occur inside web captions; str.splitlines() would cut the prompt in two
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\u2028on a mat\r\nsecond\u0085prompt\n\nthird\n", encoding="utf-8")
    assert train.read_lines(str(path)) == ["a cat\u2028on a mat", "second\u0085prompt", "third"]
