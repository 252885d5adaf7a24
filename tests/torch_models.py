"""Random diffusers UNet2DModels with every weight perturbed (so no parameter is zero or one)."""

import torch
from diffusers import UNet2DModel

COURSE = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
              block_out_channels=(64, 128, 128, 256),
              down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
              up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
SCALE_SHIFT = dict(sample_size=16, block_out_channels=(32, 64, 96), layers_per_block=1, norm_num_groups=16,
                   down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
                   resnet_time_scale_shift="scale_shift", attention_head_dim=None, mid_block_scale_factor=1.414,
                   center_input_sample=True, dropout=0.1, time_embedding_dim=96, act_fn="mish")
MNIST = dict(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=2,
             norm_num_groups=8, attention_head_dim=16,
             down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
             up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
# google/ddpm-cifar10-32's architecture with fewer channels
CIFAR10 = dict(sample_size=32, block_out_channels=(64, 128, 128, 128), layers_per_block=2, flip_sin_to_cos=False,
               freq_shift=1, downsample_padding=0, norm_eps=1e-6, attention_head_dim=None,
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
TINY = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            attention_head_dim=16, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"))
# levels of 2x2 and 1x1 pixels, as train_unconditional's ddpm preset has at 64 and 32 px
# (ops.small_image_conv, Downsample2D to 1x1, Upsample2D from 1x1 and 2x2)
DEEP = dict(sample_size=16, block_out_channels=(16, 32, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
            attention_head_dim=8,
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
CONFIGS = {"course": COURSE, "scale_shift": SCALE_SHIFT, "mnist": MNIST, "cifar10": CIFAR10, "deep": DEEP}


def perturbed_unet(config, seed=0, scale=0.02):
    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn_like(param))
    return model


def with_legacy_attention_names(tensors: dict) -> dict:
    """The weights renamed as checkpoints from before diffusers 0.14 (google/ddpm-*) name attention:
    query/key/value/proj_attn (written out here, not taken from flaxdiff's own map)."""
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for name, value in tensors.items():
        for new, old in legacy.items():
            name = name.replace(f".{new}.", f".{old}.")
        renamed[name] = value
    return renamed
