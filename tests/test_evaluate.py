"""evaluate.py on CPU: tiny SD and SDXL pipelines, small injected Inception / CLIP stand-ins, metrics checked against
independent float64 computations, the published JPEG pipeline, resumability, subsets with their own references,
bad inputs, 1 vs 2 processes (slow). The real torch-fidelity Inception runs in test_evaluate_fidelity.py."""

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image, ImageFilter
from tiny_clip import make_tiny_clip, tiny_clip_model
from tiny_sd import _tiny_tokenizer
from torch import nn

import evaluate

ROOT = Path(__file__).resolve().parents[1]
GEN = ["--resolution", "64", "--resize", "32", "--steps", "2", "--batch-size", "2"]
PROMPTS = ["a red cat", "a blue dog", "a photo of a tree", "a house in the snow", "a boat on the sea", "a red cat"]
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(autouse=True)
def one_thread():
    # on a small shared machine several OpenMP threads per process are far slower than one
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TinyInception(nn.Module):
    """Stand-in for the FID Inception: uint8 (B, 3, H, W) -> (pool (B, 8), logits (B, 10))."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 10)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5

    def forward(self, x):
        x = nn.functional.interpolate(x.float() / 255, size=(16, 16), mode="bilinear")
        pool = torch.tanh(self.conv(x)).mean((2, 3))
        return pool, self.fc(pool)


def tiny_clip() -> evaluate.ClipScorer:
    return evaluate.ClipScorer(tiny_clip_model(), _tiny_tokenizer(), 24, 24, OPENAI_MEAN, OPENAI_STD)


def random_images(folder: Path, n: int, size=(32, 32), seed=0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula in float64, as pytorch-fid computes it (scipy's sqrtm of the covariance product)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def sample_space_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The same formula for few samples: tr((S_a S_b)^1/2) is the nuclear norm of A B^T / sqrt((n_a-1)(n_b-1)),
    A and B the centered samples (the nonzero eigenvalues of S_a S_b are the squared singular values of A B^T)."""
    ca, cb = a - a.mean(0), b - b.mean(0)
    tr_covmean = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    trace_a, trace_b = (ca**2).sum() / (len(a) - 1), (cb**2).sum() / (len(b) - 1)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + trace_a + trace_b - 2 * tr_covmean)


def torch_fidelity_is(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """torch-fidelity's isc_features_to_metric, transcribed: numpy RandomState(2020) shuffle, parts cut at
    i * N // splits, exp(E KL(p(y|x) || p(y))) per part, mean and population std."""
    logits = logits[np.random.RandomState(2020).permutation(len(logits))].astype(np.float64)
    n, scores = len(logits), []
    for i in range(splits):
        part = logits[i * n // splits : (i + 1) * n // splits]
        p = np.exp(part - part.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        scores.append(np.exp((p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def published_jpeg(image: Image.Image, size: int, tmp: Path) -> np.ndarray:
    """What the published scripts do, with real files: save JPEG, open, resize, save JPEG, open."""
    image.save(tmp / "full.jpg")
    Image.open(tmp / "full.jpg").resize((size, size)).save(tmp / "small.jpg")
    return np.asarray(Image.open(tmp / "small.jpg").convert("RGB"))


# -----------------------------------------------------------------------------
# metric math against independent references


def test_fid_matches_scipy_and_is_zero_against_itself(tmp_path):
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 1.0
    fake = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 1.2
    ref = evaluate.feature_stats(torch.from_numpy(real))
    fid = evaluate.frechet_distance(ref, torch.from_numpy(fake))
    expected = scipy_fid(real, fake)
    assert expected > 1.0
    assert fid == pytest.approx(expected, rel=1e-9)
    assert sample_space_fid(real, fake) == pytest.approx(expected, rel=1e-9)  # the two transcriptions agree
    assert abs(evaluate.frechet_distance(ref, torch.from_numpy(real))) < 1e-9
    # a pytorch-fid style .npz (mu, sigma only, no n) gives the same value
    np.savez(tmp_path / "stats.npz", mu=ref["mu"], sigma=ref["sigma"])
    with np.load(tmp_path / "stats.npz") as f:
        assert evaluate.frechet_distance(dict(f), torch.from_numpy(fake)) == pytest.approx(expected, rel=1e-9)


def test_fid_with_fewer_images_than_features():
    # 2048-dim features from 14 and 6 images: both covariances are singular (what the tests' real Inception gives)
    rng = np.random.default_rng(1)
    real, fake = np.abs(rng.normal(size=(14, 2048))), np.abs(rng.normal(size=(6, 2048))) * 1.1
    fid = evaluate.frechet_distance(evaluate.feature_stats(torch.from_numpy(real)), torch.from_numpy(fake))
    assert fid == pytest.approx(sample_space_fid(real, fake), rel=1e-6)


def test_inception_score_is_torch_fidelitys():
    logits = torch.randn(203, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    for splits in (1, 10, 7):
        mean, std = evaluate.inception_score(logits, splits)
        assert (mean, std) == pytest.approx(torch_fidelity_is(logits.numpy(), splits), rel=1e-9)
        assert 1.0 < mean < 10.0  # IS lies between 1 and the number of classes
    assert evaluate.inception_score(logits, 1)[1] == 0.0  # one split: population std 0, not nan
    # 12 images in 10 splits: ten parts (sizes 1 and 2), not torch.chunk's six
    mean, std = evaluate.inception_score(logits[:12], 10)
    assert (mean, std) == pytest.approx(torch_fidelity_is(logits[:12].numpy(), 10), rel=1e-9)


def test_clip_score_matches_direct_cosine():
    clip = tiny_clip()
    rng = np.random.default_rng(0)
    sizes = [(32, 48), (48, 32), (24, 24), (37, 29)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    texts = ["a red cat", "a photo of a tree in the snow", "blue", "a boat"]
    got = clip(images, texts)
    # independent path, OpenCLIP's (torchvision Resize(24) then CenterCrop(24) on PIL images), written out
    resized = [((24, 36), (0, 6)), ((36, 24), (6, 0)), ((24, 24), (0, 0)), ((30, 24), (3, 0))]  # (w, h), (left, top)
    model, tok = clip.model, clip.tokenizer
    pixels = []
    for im, ((w, h), (left, top)) in zip(images, resized):
        im = im.resize((w, h), Image.BICUBIC).crop((left, top, left + 24, top + 24))
        x = (np.asarray(im, dtype=np.float32) / 255 - OPENAI_MEAN) / OPENAI_STD
        pixels.append(torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1))
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=torch.stack(pixels)).pooler_output)
        ids = [tok(t, return_tensors="pt").input_ids for t in texts]
        txt = torch.cat([model.text_projection(model.text_model(input_ids=i).pooler_output) for i in ids])
    expected = (img / img.norm(dim=-1, keepdim=True) * txt / txt.norm(dim=-1, keepdim=True)).sum(-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got.abs().max() <= 1.0 and got.std() > 0


def test_clip_folder_preprocessing_is_honoured(tmp_path):
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "navy")]
    texts = ["a red cat", "a blue sky"]
    # a folder saved by this transformers (processor_config.json in transformers 5) with OpenAI's mean/std
    default = evaluate.ClipScorer.load(str(make_tiny_clip(tmp_path / "default")), torch.device("cpu"))
    assert (default.size, default.crop) == (24, 24)
    torch.testing.assert_close(default(images, texts), tiny_clip()(images, texts))
    # another normalisation in the folder is used, not replaced by OpenAI's
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    other = evaluate.ClipScorer.load(str(make_tiny_clip(tmp_path / "other", mean, std)), torch.device("cpu"))
    expected = evaluate.ClipScorer(tiny_clip_model(), _tiny_tokenizer(), 24, 24, mean, std)(images, texts)
    torch.testing.assert_close(other(images, texts), expected)
    assert not torch.allclose(other(images, texts), default(images, texts))
    # the older file name (preprocessor_config.json, flat) is read too
    flat = json.loads((tmp_path / "other" / "processor_config.json").read_text()).get("image_processor")
    if flat is not None:
        (tmp_path / "other" / "processor_config.json").unlink()
        (tmp_path / "other" / "preprocessor_config.json").write_text(json.dumps(flat))
        legacy = evaluate.ClipScorer.load(str(tmp_path / "other"), torch.device("cpu"))
        torch.testing.assert_close(legacy(images, texts), expected)


def test_missing_libraries_and_broken_folders_say_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="^error: cannot load CLIP model /nowhere"):
        evaluate.ClipScorer.load("/nowhere", torch.device("cpu"))
    if importlib.util.find_spec("torchvision") is None:  # torch-fidelity fails at import (as here), or is missing
        with pytest.raises(
            SystemExit, match="^error: FID/IS need torch-fidelity: .*--no-deps .*same build as your torch"
        ):
            evaluate.load_inception(None)


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n  a dog  \n\n \n")  # blank lines at the end are no prompts
    (tmp_path / "p.csv").write_text('id,prompt,caption\n1,"a cat, sitting",x\n2,a dog,y\n')
    assert evaluate.load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    assert evaluate.load_prompts(str(tmp_path / "p.csv")) == ["x", "y"]  # caption before prompt
    (tmp_path / "bom.csv").write_text("\ufefftext\na cat\n", encoding="utf-8")  # as spreadsheet programs save it
    assert evaluate.load_prompts(str(tmp_path / "bom.csv")) == ["a cat"]
    with pytest.raises(SystemExit, match="^error: .* has no column text, caption or prompt .*it has id"):
        (tmp_path / "q.csv").write_text("id,words\n1,a cat\n")
        evaluate.load_prompts(str(tmp_path / "q.csv"))


def test_prompt_files_split_on_newlines_only(tmp_path):
    # U+2028 and U+0085 occur inside web captions; str.splitlines() would shift every later prompt id
    txt = tmp_path / "prompts.txt"
    txt.write_text("a cat\u2028on a mat\r\nsecond\u0085prompt\nthird\n", encoding="utf-8")
    assert evaluate.load_prompts(str(txt)) == ["a cat\u2028on a mat", "second\u0085prompt", "third"]


# -----------------------------------------------------------------------------
# the published image pipeline


def test_images_go_through_the_published_jpeg_steps(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
    evaluate.save_generated(image, tmp_path / "000000.jpg", 32, "jpg")
    with Image.open(tmp_path / "000000.jpg") as im:
        assert im.format == "JPEG" and im.size == (32, 32)
        np.testing.assert_array_equal(np.asarray(im), published_jpeg(image, 32, tmp_path))
    evaluate.save_generated(image, tmp_path / "000000.png", 32, "png")
    with Image.open(tmp_path / "000000.png") as im:
        assert im.format == "PNG"
        np.testing.assert_array_equal(np.asarray(im), np.asarray(image.resize((32, 32), Image.BICUBIC)))
    # real images: resized (no crop, any aspect), then one JPEG step; grayscale stays grayscale until the end
    for mode, size in (("RGB", (40, 30)), ("L", (30, 50))):
        real = image.convert(mode).resize(size)
        real.save(tmp_path / "real.jpg")
        got = np.asarray(evaluate.prepare_real(tmp_path / "real.jpg", 32, "jpg"))
        Image.open(tmp_path / "real.jpg").resize((32, 32)).save(tmp_path / "real32.jpg")
        np.testing.assert_array_equal(got, np.asarray(Image.open(tmp_path / "real32.jpg").convert("RGB")))


# -----------------------------------------------------------------------------
# the command: generation, resume, subsets, reference statistics, compare


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.csv"
    path.write_text("file_name,text\n" + "".join(f"{i}.jpg,{p}\n" for i, p in enumerate(PROMPTS)))
    return path


def run(argv, **kw):
    return evaluate.main([str(a) for a in argv], **kw)


def pixels(folder: Path, suffix="jpg") -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob(f"*.{suffix}"))}


def real_features(folder: Path, inception: nn.Module, size: int = 32) -> np.ndarray:
    """The reference pipeline written out with files: open, resize, save JPEG, open; then the network."""
    arrays = []
    for path in sorted(folder.iterdir()):
        Image.open(path).resize((size, size)).save(folder.parent / "tmp.jpg")
        arrays.append(np.asarray(Image.open(folder.parent / "tmp.jpg").convert("RGB")))
    with torch.no_grad():
        return inception(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))[0].double().numpy()


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 2-image subsets: rank-1 covariances
def test_generate_resume_score_subsets(tiny_sd, tmp_path, prompt_file, capsys):
    ref = random_images(tmp_path / "real", 24)
    cats_ref = random_images(tmp_path / "real_cats", 12, size=(40, 30), seed=5)
    (tmp_path / "cats.txt").write_text("a red cat\n")
    (tmp_path / "ids.txt").write_text("1\n2\n")
    out = tmp_path / "eval"
    inception, clip = TinyInception(), tiny_clip()
    subsets = ["--subset", f"cats={tmp_path / 'cats.txt'}:{cats_ref}", "--subset", f"ids={tmp_path / 'ids.txt'}"]
    args = ["--model", tiny_sd, "--prompts", prompt_file, "--out-dir", out, "--ref", ref, *GEN, *subsets]
    run([*args, "--is-splits", "2"], inception=inception, clip=clip)
    images = pixels(out / "images")
    assert list(images) == [f"{i:06d}.jpg" for i in range(6)]
    assert all(a.shape == (32, 32, 3) for a in images.values())
    assert (images["000000.jpg"] != images["000005.jpg"]).any()  # same prompt, different seed

    report = json.loads((out / "metrics.json").read_text())
    m = report["metrics"]
    assert {k: v["n"] for k, v in m.items()} == {"all": 6, "cats": 2, "ids": 2}
    assert report["protocol"]["generation"]["steps"] == 2 and report["protocol"]["image_format"] == "jpg"
    assert report["protocol"]["generation"]["scheduler"] == "PNDMScheduler"  # SD v1's own, as in the paper
    assert report["protocol"]["is"] == {"splits": 2, "shuffle_seed": 2020, "std": "population (ddof 0)"}
    assert (m["all"]["fid_reference"], m["cats"]["fid_reference"], m["ids"]["fid_reference"]) == (
        str(ref),
        str(cats_ref),
        str(ref),
    )
    # every value equals the metric recomputed from features of exactly that subset's images
    with torch.no_grad():
        x = torch.from_numpy(np.stack([a.astype(np.uint8) for a in images.values()])).permute(0, 3, 1, 2)
        pool, logits = (t.double().numpy() for t in inception(x))
    cosines = tiny_clip()([Image.open(p) for p in sorted((out / "images").iterdir())], PROMPTS).numpy()
    reals = {str(ref): real_features(ref, inception), str(cats_ref): real_features(cats_ref, inception)}
    for name, ids in {"all": range(6), "cats": [0, 5], "ids": [1, 2]}.items():
        ids = list(ids)
        assert m[name]["fid"] == pytest.approx(sample_space_fid(reals[m[name]["fid_reference"]], pool[ids]), rel=1e-6)
        assert m[name]["clip_score"] == pytest.approx(cosines[ids].mean(), abs=1e-6)
        assert (m[name]["is_mean"], m[name]["is_std"]) == pytest.approx(torch_fidelity_is(logits[ids], 2), rel=1e-9)
    console = capsys.readouterr().out
    assert "cats" in console and f"{m['all']['clip_score']:.4f}" in console
    assert f"FID of ids against --ref {ref}, the reference of all prompts" in console

    # resume: nothing regenerated but a deleted and a truncated image; both come back, even with another batch size
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    (out / "images" / "000003.jpg").unlink()
    data = (out / "images" / "000004.jpg").read_bytes()
    (out / "images" / "000004.jpg").write_bytes(data[: len(data) // 2])
    run([*args, "--batch-size", "3", "--metrics", "none"])
    assert "generating 2 of 6 images (1 unreadable)" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.name not in ("000003.jpg", "000004.jpg"))
    again = pixels(out / "images")
    assert all(np.abs(again[k] - images[k]).max() <= 2 for k in ("000003.jpg", "000004.jpg"))
    # other settings, or other prompts for the same image ids, into the same folder are refused
    with pytest.raises(SystemExit, match="other settings .*steps"):
        run([*args, "--steps", "3", "--metrics", "none"])
    with pytest.raises(SystemExit, match="other settings .*image_format"):
        run([*args, "--image-format", "png", "--metrics", "none"])
    (tmp_path / "other.txt").write_text("a red cat\na green horse\n")
    with pytest.raises(SystemExit, match="image 1 in .* was made for the prompt 'a blue dog', not 'a green horse'"):
        run(["--prompts", tmp_path / "other.txt", "--out-dir", out, "--metrics", "clip"], clip=clip)
    # fewer prompts (a prefix) score the images they name
    run(["--prompts", prompt_file, "--num-prompts", "3", "--out-dir", out, "--metrics", "clip"], clip=clip)
    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"]["all"]["n"] == 3 and report["protocol"]["generation"]["steps"] == 2
    # an unreadable image is never scored: without --model the run names it and says what to do
    (out / "images" / "000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit, match=r"^error: cannot read .*000001\.jpg .*run again with --model"):
        run(["--prompts", prompt_file, "--out-dir", out, "--metrics", "clip"], clip=clip)
    # lossless PNGs on request: same images, without the JPEG losses
    png_args = ["--prompts", prompt_file, "--num-prompts", "2", "--out-dir", tmp_path / "png", "--image-format", "png"]
    run(["--model", tiny_sd, *png_args, *GEN, "--metrics", "none"])
    png = pixels(tmp_path / "png" / "images", "png")
    assert list(png) == ["000000.png", "000001.png"]
    assert 0 < np.abs(png["000000.png"] - images["000000.jpg"]).mean() < 40  # noise-like images: big JPEG losses


def test_sdxl_pipeline_is_sampled_at_its_own_size_and_scored(tiny_sdxl, tmp_path, prompt_file):
    from diffusers import StableDiffusionXLPipeline

    ref = random_images(tmp_path / "real", 24)
    out = tmp_path / "eval"
    inception, clip = TinyInception(), tiny_clip()
    gen = ["--steps", "2", "--resize", "32", "--batch-size", "3"]  # no --resolution: the pipeline's own size
    run(
        ["--model", tiny_sdxl, "--prompts", prompt_file, "--out-dir", out, "--ref", ref, *gen, "--is-splits", "2"],
        inception=inception,
        clip=clip,
    )
    settings = json.loads((out / "generation.json").read_text())["settings"]
    # UNet sample_size 8 x VAE factor 8 (SDXL base: 128 x 8 = 1024), with the folder's own Euler scheduler
    assert (settings["resolution"], settings["scheduler"]) == (64, "EulerDiscreteScheduler")
    # the same images from the stock SDXL pipeline at its defaults, through the published JPEG steps by hand
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    images = pixels(out / "images")
    assert list(images) == [f"{i:06d}.jpg" for i in range(6)]
    for ids in ([0, 1, 2], [3, 4, 5]):
        generators = [torch.Generator().manual_seed(1234 + i) for i in ids]
        made = pipe([PROMPTS[i] for i in ids], num_inference_steps=2, guidance_scale=7.5, generator=generators).images
        for i, image in zip(ids, made):
            assert image.size == (64, 64)
            assert np.abs(images[f"{i:06d}.jpg"] - published_jpeg(image, 32, tmp_path)).max() <= 2
    assert (images["000000.jpg"] != images["000005.jpg"]).any()  # same prompt, different seed
    # every metric equals its recomputation from the image files
    m = json.loads((out / "metrics.json").read_text())["metrics"]["all"]
    with torch.no_grad():
        x = torch.from_numpy(np.stack([a.astype(np.uint8) for a in images.values()])).permute(0, 3, 1, 2)
        pool, logits = (t.double().numpy() for t in inception(x))
    cosines = clip([Image.open(p) for p in sorted((out / "images").iterdir())], PROMPTS).numpy()
    assert m["fid"] == pytest.approx(sample_space_fid(real_features(ref, inception), pool), rel=1e-6)
    assert (m["is_mean"], m["is_std"]) == pytest.approx(torch_fidelity_is(logits, 2), rel=1e-9)
    assert m["clip_score"] == pytest.approx(cosines.mean(), abs=1e-6)


def test_reference_stats_file_and_compare(tmp_path, capsys):
    ref = random_images(tmp_path / "real", 24, size=(40, 30))
    fake = random_images(tmp_path / "eval" / "images", 6, seed=1)
    for i, p in enumerate(sorted(fake.iterdir())):
        Image.open(p).save(fake / f"{i:06d}.jpg")
        p.unlink()
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    inception = TinyInception()
    run(["--ref", ref, "--save-ref-stats", tmp_path / "ref.npz", "--resize", "32"], inception=inception)
    with np.load(tmp_path / "ref.npz") as f:
        assert f["mu"].shape == (8,) and f["sigma"].shape == (8, 8) and int(f["n"]) == 24
        expected = real_features(ref, inception)
        np.testing.assert_allclose(f["mu"], expected.mean(0), rtol=1e-6)
        np.testing.assert_allclose(f["sigma"], np.cov(expected, rowvar=False), rtol=1e-6, atol=1e-12)
    # score existing images (no --model) against the folder, then against the saved statistics
    fids = []
    for i, r in enumerate([ref, tmp_path / "ref.npz"]):
        argv = ["--prompts", tmp_path / "p.txt", "--out-dir", tmp_path / "eval", "--ref", r, "--resize", "32"]
        run([*argv, "--metrics", "fid,is", "--is-splits", "3", "--name", f"model{i}"], inception=inception)
        (tmp_path / f"m{i}.json").write_bytes((tmp_path / "eval" / "metrics.json").read_bytes())
        fids.append(json.loads((tmp_path / f"m{i}.json").read_text())["metrics"]["all"]["fid"])
    assert fids[0] == pytest.approx(fids[1], rel=1e-9)
    capsys.readouterr()
    run(["--compare", tmp_path / "m0.json", tmp_path / "m1.json"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["model", "set", "n"]
    assert [line.split()[0] for line in out[1:3]] == ["model0", "model1"]
    assert f"{fids[0]:.2f}" in out[1]


# -----------------------------------------------------------------------------
# bad input: one clear line, non-zero exit, nothing written


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bad_inputs(tiny_sd, tmp_path, prompt_file):
    inception = TinyInception()
    ref = random_images(tmp_path / "real", 24)
    (tmp_path / "empty.txt").write_text("\n\n")
    mixed = random_images(tmp_path / "mixed", 24)
    Image.new("RGB", (40, 32)).save(mixed / "zzz.png")
    broken = random_images(tmp_path / "broken", 3)
    (broken / "zz.png").write_bytes(b"\x89PNG truncated")
    no_unet = tmp_path / "no_unet"
    no_unet.mkdir()
    (no_unet / "model_index.json").write_text("{}")
    out = ["--out-dir", tmp_path / "o"]
    two = _write(tmp_path / "two.txt", "0\n1\n")
    cases = {
        "prompt file .* not found": ["--prompts", tmp_path / "nope.txt", *out],
        "no prompts in": ["--prompts", tmp_path / "empty.txt", *out],
        "--num-prompts 0: give at least 1": ["--prompts", prompt_file, *out, "--num-prompts", "0"],
        "--num-prompts -2: give at least 1": ["--prompts", prompt_file, *out, "--num-prompts", "-2"],
        "mixed sizes": ["--ref", mixed, "--save-ref-stats", tmp_path / "s.npz", "--resize", "0"],
        r"cannot read .*zz\.png .*remove it from the reference folder": [
            "--ref",
            broken,
            "--save-ref-stats",
            tmp_path / "s.npz",
        ],
        "cannot read .* as a .npz": ["--prompts", prompt_file, *out, "--ref", prompt_file, "--metrics", "fid"],
        "cannot load pipeline": ["--model", no_unet, "--prompts", prompt_file, *out, "--metrics", "none"],
        "6 of 6 images .* missing": [
            "--prompts",
            prompt_file,
            "--out-dir",
            tmp_path / "o2",
            "--metrics",
            "is",
            "--is-splits",
            "2",
        ],
        "unknown metric": ["--prompts", prompt_file, *out, "--metrics", "fid,kid"],
        "FID needs --ref": ["--prompts", prompt_file, *out],
        "IS in 10 splits needs as many images; set all has 6": ["--prompts", prompt_file, *out, "--metrics", "is"],
        "IS in 3 splits .* set two has 2": [
            "--prompts",
            prompt_file,
            *out,
            "--metrics",
            "is",
            "--is-splits",
            "3",
            "--subset",
            f"two={two}",
        ],
        "subset bad: prompt id 99 out of range": [
            "--prompts",
            prompt_file,
            *out,
            "--subset",
            f"bad={_write(tmp_path / 'b.txt', '99')}",
        ],
        "texts are not among the prompts": [
            "--prompts",
            prompt_file,
            *out,
            "--subset",
            f"bad={_write(tmp_path / 'c.txt', 'a green horse')}",
        ],
        "the name all is taken": ["--prompts", prompt_file, *out, "--subset", f"all={two}"],
        "reference .*missing.npz not found": [
            "--prompts",
            prompt_file,
            *out,
            "--ref",
            ref,
            "--metrics",
            "fid",
            "--subset",
            f"one={two}:{tmp_path / 'missing.npz'}",
        ],
    }
    for message, argv in cases.items():
        with pytest.raises(SystemExit, match="^error: .*" + message):
            run(argv, inception=inception)
    assert not (tmp_path / "o").exists() and not (tmp_path / "s.npz").exists()
    # --compare on files that are not metrics.json
    for text in ("{not json", '{"name": "x"}', "[1, 2]"):
        with pytest.raises(SystemExit, match="^error: cannot read .*bad.json as a metrics.json"):
            run(["--compare", _write(tmp_path / "bad.json", text)])


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--prompts", str(tmp_path / "p.csv"), "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: prompt file {tmp_path / 'p.csv'} not found"]
    help_ = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "--subset" in help_.stdout and "torchrun" in help_.stdout


# -----------------------------------------------------------------------------
# refused before any slow work, in one line, with nothing written


def refusal(argv, **kw) -> str:
    with pytest.raises(SystemExit) as e:
        run(argv, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_models_neither_here_nor_on_the_hub_are_refused_first(tiny_sd, tmp_path, prompt_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny_sd").symlink_to(tiny_sd)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "o"
    argv = ["--prompts", prompt_file, "--out-dir", out, "--metrics", "clip"]
    offline = "no such folder here, and as a hub id it is not in the local cache while the hub is offline"
    sd = ["--model", "runs/tiny_sd"]
    cases = {  # a typo of a folder that reads as a hub id, a path that cannot be one, folders without the model
        f"--model runs/tiny_sdd: {offline} (HF_HUB_OFFLINE=1)": ["--model", "runs/tiny_sdd"],
        "--model ../runs/tiny_sd: folder not found": ["--model", "../runs/tiny_sd"],
        f"--model {tmp_path / 'empty'}: the folder has no model_index.json": ["--model", tmp_path / "empty"],
        # the CLIP model is found before the pipeline makes any image
        f"--clip-model nobody/no-clip: {offline} (HF_HUB_OFFLINE=1)": [*sd, "--clip-model", "nobody/no-clip"],
        f"--clip-model {tiny_sd}: the folder has no config.json": [*sd, "--clip-model", tiny_sd],
    }
    for message, extra in cases.items():
        assert refusal([*argv, *extra]) == f"error: {message}"
    assert not out.exists()
    # online, with the hub unreachable (a closed local port): one line (no retry notices), no advice about flags
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, ROOT / "evaluate.py", *sd, "--clip-model", "nobody/no-clip", *argv]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    not_here = "error: --clip-model nobody/no-clip: no such folder here, and as a hub id it is not in the local cache"
    assert line.startswith(f"{not_here}, and the hub ({endpoint}) is unreachable or refused it (")
    assert "files_only" not in line and not out.exists()


def test_prompt_file_that_is_not_utf8_names_the_line(tmp_path):
    for name in ("latin1.txt", "latin1.csv"):
        bad = tmp_path / name
        bad.write_bytes("text\na cat\nun caf\u00e9 au lait\n".encode("latin-1"))
        message = refusal(["--prompts", bad, "--out-dir", tmp_path / "o", "--metrics", "none"])
        assert message == f"error: {bad} line 3 is not UTF-8 (byte 0xe9); save the file as UTF-8"
    assert not (tmp_path / "o").exists()


def test_blank_prompts_are_refused_with_their_line(tmp_path):
    txt = _write(tmp_path / "p.txt", "a cat\n\na dog\n")
    table = _write(tmp_path / "p.csv", 'file_name,text\n0.jpg,a cat\n1.jpg,"a dog\non a mat"\n2.jpg, \n3.jpg,a bird\n')
    for path, line in ((txt, 2), (table, 5)):  # the csv's third row is on line 5 (its second spans two lines)
        message = refusal(["--prompts", path, "--out-dir", tmp_path / "o", "--metrics", "none"])
        assert message.startswith(f"error: {path} line {line}: blank prompt")
    assert not (tmp_path / "o").exists()


def test_out_dir_that_cannot_be_written_is_refused_before_any_model_loads(tmp_path, prompt_file):
    broken = tmp_path / "broken"  # a pipeline folder that would fail to load: the out-dir is refused first
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    (tmp_path / "file").write_text("not a folder")
    cases = {tmp_path / "file" / "eval": f"{tmp_path / 'file'} is a file"}
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    if not os.access(read_only, os.W_OK):  # (root writes anywhere)
        cases[read_only / "eval"] = f"{read_only} is read-only"
    for out, why in cases.items():
        message = refusal(["--model", broken, "--prompts", prompt_file, "--out-dir", out, "--metrics", "none"])
        assert message == f"error: --out-dir {out} cannot be written: {why}"
        assert not out.exists()


def test_threads_sets_torchs_cpu_threads(tmp_path):
    ref = random_images(tmp_path / "real", 24)
    argv = ["--ref", ref, "--save-ref-stats", tmp_path / "ref.npz", "--resize", "32"]
    run([*argv, "--threads", "2"], inception=TinyInception())
    assert torch.get_num_threads() == 2 and (tmp_path / "ref.npz").is_file()
    run([*argv, "--threads", "0"], inception=TinyInception())  # 0: left as torch has it
    assert torch.get_num_threads() == 2
    assert refusal([*argv, "--threads", "-1"]) == "error: --threads -1: give 0 (torch's choice) or more"


def test_help_gives_every_flag_a_text_and_each_default_once(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    helps = {}
    for entry in re.split(r"\n  (?=-)", text[text.index("options:") :])[1:]:  # per flag: invocation, then help
        invocation, *help_ = re.split(r"\s{2,}", entry.strip(), maxsplit=1)
        flag = next(word for word in invocation.replace(",", " ").split() if word.startswith("--"))
        helps[flag] = " ".join(" ".join(help_).split())
    assert {"--model", "--resolution", "--steps", "--guidance", "--is-splits", "--threads"} <= set(helps)
    for flag, help_ in helps.items():
        assert help_ and "default: None" not in help_ and help_.count("default") <= 1, flag
    assert helps["--steps"].endswith("(default: 25)") and "1024 SDXL" in helps["--resolution"]


def test_tiny_clip_cli_takes_its_folder_as_a_required_argument(tmp_path):
    script = str(ROOT / "tests" / "tiny_clip.py")
    help_ = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert help_.returncode == 0 and "folder" in help_.stdout
    bare = subprocess.run([sys.executable, script], capture_output=True, text=True, cwd=tmp_path)
    assert bare.returncode == 2 and "required: folder" in bare.stderr
    assert list(tmp_path.iterdir()) == []  # no model was built, in a folder named --help or elsewhere


# -----------------------------------------------------------------------------
# 1 vs 2 processes: same images, same scores (gloo on CPU)


DRIVER = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch
torch.set_num_threads(1)
import evaluate, test_evaluate
evaluate.main(sys.argv[1:], inception=test_evaluate.TinyInception(), clip=test_evaluate.tiny_clip())
"""


@pytest.mark.slow
def test_one_and_two_processes_agree(tiny_sd, tmp_path, prompt_file):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    ref = random_images(tmp_path / "real", 24)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    reports = []
    for nproc in (1, 2):
        out = tmp_path / f"eval{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", driver]
        cmd += ["--model", tiny_sd, "--prompts", prompt_file, "--out-dir", out, "--ref", ref, *GEN, "--is-splits", "2"]
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports.append(json.loads((out / "metrics.json").read_text())["metrics"]["all"])
    one, two = pixels(tmp_path / "eval1" / "images"), pixels(tmp_path / "eval2" / "images")
    assert list(one) == list(two) and len(one) == 6
    assert max(np.abs(one[k] - two[k]).max() for k in one) <= 2
    for key in ("fid", "is_mean", "clip_score"):
        assert reports[0][key] == pytest.approx(reports[1][key], rel=1e-3)


@pytest.mark.slow
def test_readme_offline_walkthrough_runs_as_written(tiny_sd, tmp_path):
    """docs/evaluate.md's 'Try it on the CPU' block, verbatim, on a pipeline folder shaped like the one
    train.py's CPU walk-through saves (runs/tiny_student) and its prompt file."""
    doc = (ROOT / "docs" / "evaluate.md").read_text(encoding="utf-8")
    section = doc[doc.index("### Try it on the CPU") :]
    block = re.sub(r"\\\n\s*", " ", re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0])
    for name in ("evaluate.py", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny_student").symlink_to(tiny_sd)
    prompts = [
        "a red cat on the sea",
        "a blue car in the city",
        "a small house in the forest",
        "a white bird in the sky",
    ]
    (tmp_path / "runs" / "prompts.txt").write_text("".join(p + "\n" for p in prompts))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs" / "eval" / "tiny_student"
    assert list(pixels(out / "images")) == [f"{i:06d}.jpg" for i in range(4)]
    assert all(a.shape == (32, 32, 3) for a in pixels(out / "images").values())
    m = json.loads((out / "metrics.json").read_text())["metrics"]["all"]
    assert m["n"] == 4 and -1 <= m["clip_score"] <= 1 and "clip_score" in m and "fid" not in m
