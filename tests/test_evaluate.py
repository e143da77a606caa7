"""evaluate.py on CPU: tiny SD pipeline, small injected Inception / CLIP stand-ins, metrics checked against
independent numpy/scipy computations, resumability, subsets, bad inputs, 1 vs 2 processes (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

import evaluate

ROOT = Path(__file__).resolve().parents[1]
GEN = ["--resolution", "64", "--resize", "32", "--steps", "2", "--batch-size", "2"]
PROMPTS = ["a red cat", "a blue dog", "a photo of a tree", "a house in the snow", "a boat on the sea", "a red cat"]


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
    from tiny_sd import _tiny_tokenizer
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=24,
            patch_size=8,
        ),
        projection_dim=16,
    )
    return evaluate.ClipScorer(CLIPModel(config), tokenizer, image_size=24)


def random_images(folder: Path, n: int, size=(32, 32), seed=0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula in float64 (as pytorch-fid computes it)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


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
    assert abs(fid - expected) / expected < 1e-6
    assert abs(evaluate.frechet_distance(ref, torch.from_numpy(real))) < 1e-6
    # a pytorch-fid style .npz (mu, sigma only, no n) gives the same value
    np.savez(tmp_path / "stats.npz", mu=ref["mu"], sigma=ref["sigma"])
    with np.load(tmp_path / "stats.npz") as f:
        assert abs(evaluate.frechet_distance(dict(f), torch.from_numpy(fake)) - expected) / expected < 1e-6


def direct_inception_score(logits: np.ndarray, splits: int, perm: np.ndarray) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split, mean and (unbiased) std over splits."""
    logits = logits[perm]
    scores = []
    for part in np.array_split(logits, splits):
        p = np.exp(part - part.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        py = p.mean(0, keepdims=True)
        scores.append(np.exp((p * (np.log(p) - np.log(py))).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores, ddof=1)) if splits > 1 else float("nan")


def test_inception_score_matches_direct_computation():
    logits = torch.randn(200, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    mean, _ = evaluate.inception_score(logits, splits=1)
    assert mean == pytest.approx(direct_inception_score(logits.numpy(), 1, np.arange(200))[0], rel=1e-9)
    assert 1.0 < mean < 10.0  # IS lies between 1 and the number of classes
    # with splits, the shuffle is torch.randperm after manual_seed(0): reproduce it
    torch.manual_seed(0)
    perm = torch.randperm(200).numpy()
    mean, std = evaluate.inception_score(logits, splits=5)
    exp_mean, exp_std = direct_inception_score(logits.numpy(), 5, perm)
    assert (mean, std) == (pytest.approx(exp_mean, rel=1e-9), pytest.approx(exp_std, rel=1e-9))
    assert evaluate.inception_score(logits, splits=5) == (mean, std)  # reruns agree


def test_clip_score_matches_direct_cosine():
    clip = tiny_clip()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)) for _ in range(3)]
    texts = ["a red cat", "a photo of a tree in the snow", "blue"]
    got = clip(images, texts)
    # independent path: crop by hand, run the towers, project, normalise, dot
    model, tok = clip.model, clip.tokenizer
    pixels = []
    for im in images:
        im = im.resize((36, 24), Image.BICUBIC).crop((6, 0, 30, 24))  # shorter side 32 -> 24, center 24x24
        x = (np.asarray(im, dtype=np.float32) / 255 - evaluate.OPENAI_CLIP_MEAN) / evaluate.OPENAI_CLIP_STD
        pixels.append(torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1))
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=torch.stack(pixels)).pooler_output)
        ids = [tok(t, return_tensors="pt").input_ids for t in texts]
        txt = torch.cat([model.text_projection(model.text_model(input_ids=i).pooler_output) for i in ids])
    expected = (img / img.norm(dim=-1, keepdim=True) * txt / txt.norm(dim=-1, keepdim=True)).sum(-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got.abs().max() <= 1.0 and got.std() > 0


def test_clip_loads_from_a_saved_folder(tmp_path):
    clip = tiny_clip()
    clip.model.save_pretrained(tmp_path / "clip")
    clip.tokenizer.save_pretrained(tmp_path / "clip")
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "navy")]
    texts = ["a red cat", "a blue sky"]
    loaded = evaluate.ClipScorer.load(str(tmp_path / "clip"), torch.device("cpu"))
    assert loaded.image_size == 24
    torch.testing.assert_close(loaded(images, texts), clip(images, texts))
    # the folder's own normalisation wins over the OpenAI defaults
    config = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps(config))
    assert not torch.allclose(
        evaluate.ClipScorer.load(str(tmp_path / "clip"), torch.device("cpu"))(images, texts), clip(images, texts)
    )


def test_missing_weights_and_libraries_say_how_to_get_them(tmp_path):
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(evaluate.DEFAULT_CLIP, "config.json"), str):  # offline, not cached
        with pytest.raises(SystemExit, match="^error: cannot load CLIP model laion/.*hf download"):
            evaluate.ClipScorer.load(evaluate.DEFAULT_CLIP, torch.device("cpu"))
    with pytest.raises(SystemExit, match="^error: --clip-model /nowhere: no such folder"):
        evaluate.ClipScorer.load("/nowhere", torch.device("cpu"))
    try:
        import torch_fidelity  # noqa: F401
    except Exception:
        with pytest.raises(SystemExit, match="^error: FID/IS need torch-fidelity .*pip install torch-fidelity"):
            evaluate.load_inception(None)
    else:
        with pytest.raises(SystemExit, match="^error: --inception-weights .* not found"):
            evaluate.load_inception(str(tmp_path / "missing.pth"))


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    (tmp_path / "p.jsonl").write_text('{"caption": "a cat", "id": 1}\n\n{"caption": "a dog", "id": 2}\n')
    (tmp_path / "p.csv").write_text('id,prompt,caption\n1,"a cat, sitting",x\n2,a dog,y\n')
    assert evaluate.load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    assert evaluate.load_prompts(str(tmp_path / "p.jsonl")) == ["a cat", "a dog"]
    assert evaluate.load_prompts(str(tmp_path / "p.csv")) == ["x", "y"]  # caption before prompt
    assert evaluate.load_prompts(str(tmp_path / "p.csv"), "prompt") == ["a cat, sitting", "a dog"]
    with pytest.raises(SystemExit, match="^error: .* has no column text, caption or prompt .*it has id"):
        (tmp_path / "q.csv").write_text("id,words\n1,a cat\n")
        evaluate.load_prompts(str(tmp_path / "q.csv"))


# -----------------------------------------------------------------------------
# the command: generation, resume, subsets, reference statistics, compare


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.csv"
    path.write_text("file_name,text\n" + "".join(f"{i}.jpg,{p}\n" for i, p in enumerate(PROMPTS)))
    return path


def run(argv, **kw):
    return evaluate.main([str(a) for a in argv], **kw)


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob("*.png"))}


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 2-image subsets: rank-1 covariances
def test_generate_resume_score_subsets(tiny_sd, tmp_path, prompt_file, capsys):
    ref = random_images(tmp_path / "real", 24)
    (tmp_path / "cats.txt").write_text("a red cat\n")
    (tmp_path / "ids.txt").write_text("1\n2\n")
    out = tmp_path / "eval"
    inception, clip = TinyInception(), tiny_clip()
    args = [
        "--model",
        tiny_sd,
        "--prompts",
        prompt_file,
        "--out-dir",
        out,
        "--ref",
        ref,
        *GEN,
        "--subset",
        f"cats={tmp_path / 'cats.txt'}",
        "--subset",
        f"ids={tmp_path / 'ids.txt'}",
        "--is-splits",
        "2",
    ]
    run(args, inception=inception, clip=clip)
    images = pixels(out / "images")
    assert list(images) == [f"{i:06d}.png" for i in range(6)]
    assert all(a.shape == (32, 32, 3) for a in images.values())
    assert (images["000000.png"] != images["000005.png"]).any()  # same prompt, different seed

    report = json.loads((out / "metrics.json").read_text())
    m = report["metrics"]
    assert {k: v["n"] for k, v in m.items()} == {"all": 6, "cats": 2, "ids": 2}
    assert report["protocol"]["generation"]["steps"] == 2 and report["protocol"]["image_size"] == [32, 32]
    assert "torch" in report["versions"] and "raw cosine" in report["protocol"]["clip"]["scale"]
    # every value equals the metric recomputed from features of exactly that subset's images
    paths = [out / "images" / f"{i:06d}.png" for i in range(6)]
    feats = evaluate.extract(paths, PROMPTS, inception, clip, 4, torch.device("cpu"), "test")
    real = evaluate.extract(sorted(ref.iterdir()), None, inception, None, 4, torch.device("cpu"), "test")["pool"]
    for name, ids in {"all": range(6), "cats": [0, 5], "ids": [1, 2]}.items():
        ids = list(ids)
        fid = scipy_fid(real.numpy(), feats["pool"][ids].numpy())
        assert m[name]["fid"] == pytest.approx(fid, rel=1e-5)
        assert m[name]["clip_score"] == pytest.approx(feats["clip"][ids].mean().item(), abs=1e-6)
        assert m[name]["is_mean"] == pytest.approx(evaluate.inception_score(feats["logits"][ids], 2)[0], rel=1e-9)
    assert m["cats"]["fid"] != m["ids"]["fid"]
    table = capsys.readouterr().out
    assert "cats" in table and f"{m['all']['clip_score']:.4f}" in table

    # resume: nothing regenerated; a deleted image comes back identical, even with another batch size
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    (out / "images" / "000003.png").unlink()
    run([*args, "--batch-size", "3", "--metrics", "none"])
    assert "generating 1 of 6 images (5 already on disk)" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.name != "000003.png")
    assert np.abs(pixels(out / "images")["000003.png"] - images["000003.png"]).max() <= 1
    # a student UNet swapped into the pipeline (here the same UNet) makes the same images; --scheduler is recorded
    run(
        [
            "--model",
            tiny_sd,
            "--unet",
            tiny_sd,
            "--prompts",
            prompt_file,
            "--num-prompts",
            "2",
            "--out-dir",
            tmp_path / "swap",
            *GEN,
            "--metrics",
            "none",
        ]
    )
    swapped = pixels(tmp_path / "swap" / "images")
    assert list(swapped) == ["000000.png", "000001.png"]
    assert all(np.abs(swapped[k] - images[k]).max() <= 1 for k in swapped)
    run(
        [
            "--model",
            tiny_sd,
            "--prompts",
            prompt_file,
            "--num-prompts",
            "1",
            "--out-dir",
            tmp_path / "ddim",
            *GEN,
            "--scheduler",
            "ddim",
            "--metrics",
            "none",
        ]
    )
    assert json.loads((tmp_path / "ddim" / "generation.json").read_text())["settings"]["scheduler"] == "DDIMScheduler"
    # other settings, or other prompts for the same image ids, into the same folder are refused
    with pytest.raises(SystemExit, match="other settings .*steps"):
        run([*args[:-2], "--steps", "3", "--metrics", "none"])
    (tmp_path / "other.txt").write_text("a red cat\na green horse\n")
    with pytest.raises(SystemExit, match="image 1 in .* was made for the prompt 'a blue dog', not 'a green horse'"):
        run(["--prompts", tmp_path / "other.txt", "--out-dir", out, "--metrics", "clip"], clip=clip)
    # fewer prompts (a prefix) score the images they name
    run(["--prompts", prompt_file, "--num-prompts", "3", "--out-dir", out, "--metrics", "clip"], clip=clip)
    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"]["all"]["n"] == 3 and report["protocol"]["generation"]["steps"] == 2


def test_reference_stats_file_and_compare(tmp_path, capsys):
    ref = random_images(tmp_path / "real", 24)
    fake = random_images(tmp_path / "eval" / "images", 6, seed=1)
    for i, p in enumerate(sorted(fake.iterdir())):
        p.rename(fake / f"{i:06d}.png")
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    inception = TinyInception()
    run(["--ref", ref, "--save-ref-stats", tmp_path / "ref.npz"], inception=inception)
    with np.load(tmp_path / "ref.npz") as f:
        assert f["mu"].shape == (8,) and f["sigma"].shape == (8, 8) and int(f["n"]) == 24
    # score existing images (no --model) against the folder, then against the saved statistics
    fids = []
    for i, r in enumerate([ref, tmp_path / "ref.npz"]):
        run(
            [
                "--prompts",
                tmp_path / "p.txt",
                "--out-dir",
                tmp_path / "eval",
                "--ref",
                r,
                "--metrics",
                "fid,is",
                "--name",
                f"model{i}",
            ],
            inception=inception,
        )
        (tmp_path / f"m{i}.json").write_bytes((tmp_path / "eval" / "metrics.json").read_bytes())
        fids.append(json.loads((tmp_path / f"m{i}.json").read_text())["metrics"]["all"]["fid"])
    assert fids[0] == pytest.approx(fids[1], rel=1e-9)
    # --ref-resize: real images of any size, resized on the fly like images resized beforehand
    mixed = random_images(tmp_path / "mixed", 12, size=(40, 30))
    for p in random_images(tmp_path / "tall", 12, size=(20, 50), seed=3).iterdir():
        p.rename(mixed / f"tall{p.name}")
    resized = tmp_path / "resized"
    resized.mkdir()
    for p in mixed.iterdir():
        Image.open(p).resize((32, 32), Image.BICUBIC).save(resized / p.name)
    run(["--ref", mixed, "--ref-resize", "32", "--save-ref-stats", tmp_path / "a.npz"], inception=inception)
    run(["--ref", resized, "--save-ref-stats", tmp_path / "b.npz"], inception=inception)
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert int(a["n"]) == 24 and np.allclose(a["sigma"], b["sigma"], rtol=0, atol=1e-12)
    capsys.readouterr()
    run(["--compare", tmp_path / "m0.json", tmp_path / "m1.json"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["model", "set", "n"]
    assert [line.split()[0] for line in out[1:3]] == ["model0", "model1"]
    assert f"{fids[0]:.2f}" in out[1]


# -----------------------------------------------------------------------------
# bad input: one clear line, non-zero exit


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bad_inputs(tiny_sd, tmp_path, prompt_file):
    inception = TinyInception()
    ref = random_images(tmp_path / "real", 24)
    (tmp_path / "empty.txt").write_text("\n\n")
    small = random_images(tmp_path / "small", 5)
    mixed = random_images(tmp_path / "mixed", 24)
    Image.new("RGB", (40, 32)).save(mixed / "zzz.png")
    no_unet = tmp_path / "no_unet"
    no_unet.mkdir()
    (no_unet / "model_index.json").write_text("{}")
    cases = {
        "prompt file .* not found": ["--prompts", tmp_path / "nope.txt", "--out-dir", tmp_path / "o"],
        "no prompts in": ["--prompts", tmp_path / "empty.txt", "--out-dir", tmp_path / "o"],
        "5 images; a 8-dim covariance needs more than 8": ["--ref", small, "--save-ref-stats", tmp_path / "s.npz"],
        "mixed sizes": ["--ref", mixed, "--save-ref-stats", tmp_path / "s.npz"],
        "has no unet/ folder": [
            "--model",
            no_unet,
            "--prompts",
            prompt_file,
            "--out-dir",
            tmp_path / "o",
            "--ref",
            ref,
        ],
        "no UNet config.json": [
            "--model",
            tiny_sd,
            "--unet",
            tmp_path,
            "--prompts",
            prompt_file,
            "--out-dir",
            tmp_path / "o",
            "--metrics",
            "none",
        ],
        "6 of 6 images missing": ["--prompts", prompt_file, "--out-dir", tmp_path / "o2", "--metrics", "is"],
        "unknown metric": ["--prompts", prompt_file, "--out-dir", tmp_path / "o", "--metrics", "fid,kid"],
        "FID needs --ref": ["--prompts", prompt_file, "--out-dir", tmp_path / "o"],
        "subset bad: prompt id 99 out of range": [
            "--prompts",
            prompt_file,
            "--out-dir",
            tmp_path / "o",
            "--subset",
            f"bad={_write(tmp_path / 'b.txt', '99')}",
        ],
        "texts are not among the prompts": [
            "--prompts",
            prompt_file,
            "--out-dir",
            tmp_path / "o",
            "--subset",
            f"bad={_write(tmp_path / 'c.txt', 'a green horse')}",
        ],
    }
    for message, argv in cases.items():
        with pytest.raises(SystemExit, match="^error: .*" + message):
            run(argv, inception=inception)


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "evaluate.py"),
            "--prompts",
            str(tmp_path / "missing.csv"),
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: prompt file")
    assert "Traceback" not in proc.stderr
    help_ = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "--subset" in help_.stdout and "torchrun" in help_.stdout


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
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(driver),
            "--model",
            str(tiny_sd),
            "--prompts",
            str(prompt_file),
            "--out-dir",
            str(out),
            "--ref",
            str(ref),
            *GEN,
            "--is-splits",
            "2",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports.append(json.loads((out / "metrics.json").read_text())["metrics"]["all"])
    one, two = pixels(tmp_path / "eval1" / "images"), pixels(tmp_path / "eval2" / "images")
    assert list(one) == list(two) and len(one) == 6
    assert max(np.abs(one[k] - two[k]).max() for k in one) <= 1
    for key in ("fid", "is_mean", "clip_score"):
        assert reports[0][key] == pytest.approx(reports[1][key], rel=1e-3)


def test_prompt_files_split_on_newlines_only(tmp_path):
    # U+2028 and U+0085 occur inside web captions; str.splitlines() would shift every later prompt id
    txt = tmp_path / "prompts.txt"
    txt.write_text("a cat\u2028on a mat\r\nsecond\u0085prompt\n\nthird\n", encoding="utf-8")
    assert evaluate.load_prompts(str(txt)) == ["a cat\u2028on a mat", "second\u0085prompt", "third"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"text": "a cat\u2028on a mat"}\n{"text": "b"}\n', encoding="utf-8")
    assert evaluate.load_prompts(str(jsonl)) == ["a cat\u2028on a mat", "b"]
