"""A tiny SDXL-shaped pipeline for CPU tests, and SDXL base 1.0's real UNet config.

Same topology as SDXL base 1.0's UNet (a plain down stage, then two cross-attention stages with 1, 2
and 10 transformer blocks, a cross-attention mid block of 10, linear projections, "text_time" added
conditions) with tiny widths; two text encoders (a CLIPTextModel and a CLIPTextModelWithProjection)
whose penultimate states concatenate to the UNet's cross-attention width, as in SDXL.
"""

import argparse
from pathlib import Path

import torch
from tiny_sd import _tiny_tokenizer

# SDXL base 1.0's UNet config (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), minus defaults.
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + 1280 pooled text
    norm_num_groups=32,
)
TINY_UNET = SDXL_UNET | dict(
    sample_size=8,  # 64 px through the VAE's factor 8
    block_out_channels=[32, 64, 64],
    attention_head_dim=[2, 4, 4],
    cross_attention_dim=32 + 48,  # text_encoder (32) + text_encoder_2 (48)
    addition_embed_type_num_heads=4,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 48,
    norm_num_groups=8,
)


def make_tiny_sdxl(out_dir: Path) -> Path:
    """Build, save (safetensors) and return a tiny SDXL-shaped pipeline folder."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer(16)

    def text_config(width: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=3,  # SDXL reads the penultimate layer's states
            num_attention_heads=4,
            max_position_embeddings=16,
            projection_dim=width,
            hidden_act="gelu",
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        )

    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.13025,  # SDXL's
        force_upcast=True,  # SDXL's VAE overflows in float16
    )
    scheduler = EulerDiscreteScheduler(  # SDXL base 1.0's scheduler config
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config(32)),
        text_encoder_2=CLIPTextModelWithProjection(text_config(48)),
        tokenizer=tokenizer,
        tokenizer_2=_tiny_tokenizer(16),
        unet=UNet2DConditionModel(**TINY_UNET),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(Path(out_dir), safe_serialization=True)
    return Path(out_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build a tiny SDXL-shaped pipeline folder for tests.")
    parser.add_argument("folder", help="where to save the pipeline")
    print(make_tiny_sdxl(Path(parser.parse_args().folder)))
