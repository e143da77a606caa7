"""train.py on a tiny SDXL-shaped teacher: KOALA students (sizes, teacher init, feature layers), the
conditioning the pipeline uses, training on 1 and 2 processes, exact resume, the exported pipeline, and
the inputs refused for mixing the SD and SDXL families. Token-shaped features of SD 2 / SDXL too."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import ENV, FAST, PROMPTS, ROOT, cmd, error_of, meta_unet, run_inproc
from tiny_sdxl import SDXL_UNET

import train

# the KOALA model card's UNet sizes, equal to diffusers models built from these configs
KOALA_PARAMS = {"koala_1b": 1_161_184_324, "koala_700m": 782_822_724}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sdxl_cache(tiny_sdxl, tmp_path_factory):
    """An image-free SDXL latent cache built by train.py (--max-steps 0 builds and stops)."""
    d = tmp_path_factory.mktemp("sdxl")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    prompts = ["--prompts", str(d / "prompts.txt"), "--student", "koala_700m"]
    run_inproc(tiny_sdxl, d / "data", d / "out0", *prompts, "--max-steps", "0")
    return d / "data"


# -----------------------------------------------------------------------------
# KOALA students


@pytest.mark.parametrize("name", ["koala_1b", "koala_700m"])
def test_koala_configs_give_the_published_sizes_at_sdxl_scale(name):
    cfg = train.student_config(SDXL_UNET, name)
    assert cfg["layers_per_block"] == 1
    assert list(cfg["transformer_layers_per_block"]) == ([1, 2, 6] if name == "koala_1b" else [1, 2, 5])
    assert cfg["mid_block_type"] == ("UNetMidBlock2DCrossAttn" if name == "koala_1b" else None)
    assert {
        k: v for k, v in cfg.items() if k not in ("layers_per_block", "transformer_layers_per_block", "mid_block_type")
    } == {
        k: v
        for k, v in SDXL_UNET.items()
        if k not in ("layers_per_block", "transformer_layers_per_block", "mid_block_type")
    }
    assert sum(p.numel() for p in meta_unet(cfg).parameters()) == KOALA_PARAMS[name]
    assert sum(p.numel() for p in meta_unet(SDXL_UNET).parameters()) == 2_567_463_684  # the teacher


# KOALA's teacher init written out: student module <- teacher module. Everything else keeps its name,
# an attention with fewer transformer blocks included (it keeps the teacher's first blocks).
KOALA_UP_PATH = {
    "up_blocks.0.resnets.1": "up_blocks.0.resnets.2",
    "up_blocks.0.attentions.1": "up_blocks.0.attentions.2",
    "up_blocks.1.resnets.1": "up_blocks.1.resnets.2",
    "up_blocks.1.attentions.1": "up_blocks.1.attentions.2",
    "up_blocks.2.resnets.1": "up_blocks.2.resnets.2",
}


def koala_feature_pairs(depth: int, mid: bool) -> dict[str, str]:
    """The official KOALA feature-KD list (KOALA-1B's typos corrected), written out."""
    attn = "attentions.{}.transformer_blocks.{}.attn1"
    pairs = {f"down_blocks.1.{attn.format(0, b)}": f"down_blocks.1.{attn.format(0, b)}" for b in range(2)}
    pairs |= {f"down_blocks.2.{attn.format(0, b)}": f"down_blocks.2.{attn.format(0, b)}" for b in range(depth)}
    for stage, blocks in ((0, depth), (1, 2)):
        for s, t in ((0, 0), (1, 2)):
            pairs |= {
                f"up_blocks.{stage}.{attn.format(s, b)}": f"up_blocks.{stage}.{attn.format(t, b)}"
                for b in range(blocks)
            }
    if mid:
        pairs |= {f"mid_block.{attn.format(0, b)}": f"mid_block.{attn.format(0, b)}" for b in range(depth)}
    pairs["down_blocks.0.downsamplers.0.conv"] = "down_blocks.0.downsamplers.0.conv"
    pairs["up_blocks.2.resnets.1.conv2"] = "up_blocks.2.resnets.2.conv2"
    return pairs


@pytest.mark.parametrize("name", ["koala_1b", "koala_700m"])
def test_koala_students_of_the_tiny_sdxl_teacher(tiny_sdxl, name):
    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    student, layers = train.build_student(teacher, name, None)
    t_state = teacher.state_dict()
    for k, v in student.state_dict().items():  # every student tensor is the teacher tensor the table names
        prefix = next((s for s in KOALA_UP_PATH if k.startswith(s + ".")), None)
        source = KOALA_UP_PATH[prefix] + k[len(prefix) :] if prefix else k
        assert torch.equal(v, t_state[source]), k
    depth, mid = (6, True) if name == "koala_1b" else (5, False)
    assert layers == koala_feature_pairs(depth, mid)
    assert len(layers) == (32 if name == "koala_1b" else 23)
    for s, t in layers.items():  # each exists on both sides
        student.get_submodule(s), teacher.get_submodule(t)


def test_token_features_meet_per_token_with_linear_projections():
    """A c_* student of an SD 2-shaped teacher hooks proj_out, an nn.Linear: (B, N, C) sequences."""
    from diffusers import UNet2DConditionModel

    from randcond import FeatureDistiller

    sd2 = dict(
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(64, 64, 128, 128),
        layers_per_block=2,
        norm_num_groups=8,
        attention_head_dim=[2, 4, 4, 4],
        cross_attention_dim=32,
        use_linear_projection=True,
    )
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**sd2)
    student, layers = train.build_student(teacher, "c_small", None)
    distiller = FeatureDistiller(teacher, student, layers)
    x, t, ehs = torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.randn(2, 16, 32)
    distiller.probe(x, t, ehs)
    linear = [k for k, m in distiller.proj.items() if isinstance(m, torch.nn.Linear)]
    assert sorted(linear) == ["mid_block__attentions__0__proj_out", "up_blocks__3__attentions__2__proj_out"]
    with distiller:
        teacher(x, t, ehs), student(x, t, ehs)
        s_feats, t_feats = distiller.features()
        loss = distiller.loss()
    # plain transcription: mean over (B, N, C) of (s W^T + b - t)^2 for token layers, 1x1 conv for maps
    expected = 0.0
    for name, s, tf in zip(layers, s_feats, t_feats):
        p = distiller.proj[name.replace(".", "__")] if name.replace(".", "__") in distiller.proj else None
        if p is not None and s.dim() == 3:
            s = s @ p.weight.T + p.bias
        elif p is not None:
            s = torch.einsum("bchw,oc->bohw", s, p.weight[:, :, 0, 0]) + p.bias[:, None, None]
        expected += ((s - tf) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# -----------------------------------------------------------------------------
# paired data


def test_sdxl_cache_holds_the_teachers_latents_at_its_native_resolution(tiny_sdxl, sdxl_cache):
    from diffusers import StableDiffusionXLPipeline

    meta = json.loads((sdxl_cache / "meta.json").read_text())
    assert meta["family"] == "sdxl" and meta["resolution"] == 64 and meta["latent_shape"] == [4, 8, 8]
    lat, _ = train.LatentCache(sdxl_cache).get(np.array([3]))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        [PROMPTS[3]],
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(1234 + 3)],
        output_type="latent",
    ).images
    torch.testing.assert_close(lat[0].float(), ref[0], atol=2e-3, rtol=2e-3)


def test_sdxl_images_are_encoded_by_the_float32_vae_with_its_own_scale(tiny_sdxl, tmp_path):
    from diffusers import AutoencoderKL
    from PIL import Image

    pipe, _, _ = train.load_models(str(tiny_sdxl), "koala_700m", None, torch.bfloat16, torch.device("cpu"))
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder_2.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32  # force_upcast: SDXL's VAE overflows in half precision
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(imgs / "0.png")
    (imgs / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a cat"}))
    run_inproc(
        tiny_sdxl,
        tmp_path / "data",
        tmp_path / "o",
        "--images",
        str(imgs),
        "--max-steps",
        "0",
        "--student",
        "koala_700m",
    )
    lat, _ = train.LatentCache(tmp_path / "data").get(np.arange(1))
    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    x = torch.from_numpy(np.array(Image.open(imgs / "0.png"))).permute(2, 0, 1)[None].float() / 127.5 - 1
    ref = vae.encode(x).latent_dist.mean * 0.13025
    torch.testing.assert_close(lat.float(), ref, atol=2e-3, rtol=2e-3)


# -----------------------------------------------------------------------------
# conditioning: what training feeds the UNet is what the exported pipeline feeds it


def test_training_conditions_are_what_the_pipeline_samples_with(tiny_sdxl):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl)
    assert pipe.config.force_zeros_for_empty_prompt
    cond = train.encode_text(pipe, ["a red cat", ""], 64)
    states, added = cond["encoder_hidden_states"], cond["added_cond_kwargs"]
    assert states.shape == (2, 16, 80) and added["text_embeds"].shape == (2, 48)  # both encoders' states, pooled
    # the null condition: zeros, as the pipeline's unconditional branch (force_zeros_for_empty_prompt)
    assert not states[1].any() and not added["text_embeds"][1].any()
    seen = {}
    pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    pipe(["a red cat"], height=64, width=64, num_inference_steps=1, guidance_scale=7.5, output_type="latent")
    # the pipeline's batch is (unconditional, conditional): ours reversed; batch rounding aside, the same
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["encoder_hidden_states"], states.flip(0), **close)
    torch.testing.assert_close(seen["added_cond_kwargs"]["text_embeds"], added["text_embeds"].flip(0), **close)
    assert torch.equal(seen["added_cond_kwargs"]["time_ids"], added["time_ids"])  # (64, 64, 0, 0, 64, 64) twice


def test_sd_null_condition_is_the_encoded_empty_prompt(tiny_sd):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, feature_extractor=None)
    cond = train.encode_text(pipe, [""], 64)
    assert set(cond) == {"encoder_hidden_states"} and cond["encoder_hidden_states"].abs().sum() > 0
    _, negative = pipe.encode_prompt(["a cat"], "cpu", 1, do_classifier_free_guidance=True)
    assert torch.equal(negative, cond["encoder_hidden_states"])


# -----------------------------------------------------------------------------
# training, resume, export


def test_koala_trains_with_random_conditioning_and_exports_an_sdxl_pipeline(tiny_sdxl, sdxl_cache, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    out = tmp_path / "run"
    flags = ["--student", "koala_1b", "--rc-schedule", "constant", "--rc-lambda", "1", "--validate-every", "2"]
    run_inproc(tiny_sdxl, sdxl_cache, out, *flags, "--max-steps", "2", "--validation-steps", "2")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["loss_kd_feat"] > 0 and r["loss_kd_out"] > 0 and r["rc_swap_rate"] == 1 for r in log)
    assert (out / "samples" / "step-0000002.png").is_file()
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, StableDiffusionXLPipeline) and pipe.text_encoder_2 is not None
    assert pipe.unet.config.transformer_layers_per_block == [1, 2, 6] and pipe.config.force_zeros_for_empty_prompt
    images = pipe(["a cat"], height=64, width=64, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_koala_resume_gives_the_uninterrupted_weights(tiny_sdxl, sdxl_cache, tmp_path):
    common = ["--student", "koala_700m", "--checkpoint-every", "2", "--no-ema"]
    run_inproc(tiny_sdxl, sdxl_cache, tmp_path / "full", *common, "--max-steps", "4")
    run_inproc(tiny_sdxl, sdxl_cache, tmp_path / "cut", *common, "--max-steps", "2")
    run_inproc(tiny_sdxl, sdxl_cache, tmp_path / "cut", *common, "--max-steps", "4", "--resume")
    a, b = (load_file(tmp_path / d / "unet" / "diffusion_pytorch_model.safetensors") for d in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_koala_on_two_processes(tiny_sdxl, sdxl_cache, tmp_path):
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = cmd(tiny_sdxl, sdxl_cache, out, "--student", "koala_700m", "--max-steps", "2", "--no-ema")[1:]
    r = subprocess.run(torchrun + args, env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes x batch 2 x 1 accumulation = 4" in r.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2] and all(np.isfinite(x["loss"]) for x in log)
    assert (out / "text_encoder_2").is_dir()


# -----------------------------------------------------------------------------
# the families do not mix


def test_family_mixing_and_bad_sdxl_resolutions_are_refused(tiny_sd, tiny_sdxl, sdxl_cache, tmp_path):
    out = tmp_path / "o"
    assert "koala_* students need SDXL" in error_of(
        tiny_sd, sdxl_cache, out, "--student", "koala_1b", "--max-steps", "1"
    )
    assert "koala_* students need SDXL" in error_of(
        tiny_sdxl, sdxl_cache, out, "--student", "bk_base", "--max-steps", "1"
    )
    # SD latents at 64 px have the SDXL shape too: only the cache's record tells them apart
    sd_cache = tmp_path / "sd"
    (tmp_path / "p.txt").write_text("a cat\na dog\na car\na tree\n")
    run_inproc(tiny_sd, sd_cache, tmp_path / "o0", "--prompts", str(tmp_path / "p.txt"), "--max-steps", "0")
    msg = error_of(tiny_sdxl, sd_cache, out, "--student", "koala_700m", "--max-steps", "1")
    assert "holds sd latents" in msg and "sdxl teacher" in msg and "new --data" in msg
    msg = error_of(tiny_sdxl, sdxl_cache, out, "--student", "koala_700m", "--max-steps", "1", "--resolution", "48")
    assert "--resolution 48 must be a multiple of 32" in msg
    assert not (out / "checkpoints").exists() and not (out / "log.jsonl").exists()
    assert FAST  # the flags every run here shares
