"""Stage II of the reference method (Xia et al. 2023): the V-Net with segmentation and CMB probability.

Architecture as read from the paper's text *and* its parameter counts (section "V-Net and ResNet
Models"; Milletari et al. 2016 for V-Net):

* Encoder, four levels with 1, 2, 3, 3 convolution layers and 8, 16, 32, 64 channels; each layer
  is convolution -> batch norm -> ReLU; each level is a residual block (its input, repeated over
  channels where the count differs, is added to its output); down-sampling between levels by a
  2x2x2 convolution with stride 2 (-> batch norm -> ReLU) that doubles the channels.
* Decoder, mirroring levels 3, 2, 1: 2x2x2 transposed convolution with stride 2 halving the
  channels, concatenation with the encoder's features of that level, then residual blocks of
  3, 2, 2 convolution layers (the first one halves the concatenated channels).
* A final 1x1x1 convolution to one channel of segmentation logits; the CMB probability is the
  sigmoid of the global max-pool of those logits (= max of the voxel probabilities).

The text says 5x5x5 convolutions and 5x5x5 transposed convolutions, but with 8-64 channels that
gives 2,977,489 parameters. With 3x3x3 convolutions and 2x2x2 transposed convolutions the
count is exactly the paper's: 611,265 in total, 610,097 trainable and 1,168 non-trainable (the
batch-norm running means and variances of 584 channels: 440 in the encoder, 144 in the decoder).
The same encoder plus a dense layer reproduces the paper's ResNet total of 452,529 exactly
(``core.detect.resnet``). So the defaults here are ``kernel_size=3, up_kernel_size=2``; the text's
reading is available as ``kernel_size=5, up_kernel_size=5``. The layer split of the decoder
(3, 2, 2) is inferred from the counts (it is the split that gives both 144 batch-norm channels and
the exact total), not stated in the paper. Our network has 16 convolution layers with 3x3x3
kernels (9 encoder, 7 decoder) plus the 1x1x1 head, 3 down-sampling and 3 up-sampling layers; the
paper's "18 convolutional layers" does not say which of these it counts.

Batch norm: call ``model.eval()`` for inference (running statistics), train with batches > 1.

MONAI's ``monai.networks.nets.VNet`` does not fit: it is Milletari's original with a fixed 16-channel
top level, five levels (16-256 channels; 1, 1, 2, 3, 2 layers), 5x5x5 kernels, ELU and dropout, no
option for the width or depth, and 45,593,892 parameters; hence our own.

Input patches: 32x32x32 voxels (must be divisible by 8 for three 2x down-samplings; the paper does
not state its patch size). 32 voxels of 0.5-1 mm cover a 10 mm CMB with its surroundings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PATCH_SIZE = 32
ENCODER_LAYERS = (1, 2, 3, 3)
DECODER_LAYERS = (3, 2, 2)  # levels 3, 2, 1


def _conv_bn_relu(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, k, padding=k // 2), nn.BatchNorm3d(c_out),
                         nn.ReLU(inplace=True))


def _match_channels(x: torch.Tensor, c: int) -> torch.Tensor:
    """Residual path when the channel count changes: repeat (or fold) channels to ``c``."""
    n = x.shape[1]
    if n == c:
        return x
    if c % n == 0:
        return x.repeat(1, c // n, 1, 1, 1)
    if n % c == 0:
        return x.reshape(x.shape[0], n // c, c, *x.shape[2:]).sum(1)
    raise ValueError(f"cannot match {n} channels to {c}")


class ResidualBlock(nn.Module):
    """``layers`` x (conv -> BN -> ReLU), plus the block's input (channel-matched) as residual."""

    def __init__(self, c_in: int, c_out: int, layers: int, kernel_size: int,
                 residual_channels: int | None = None) -> None:
        super().__init__()
        convs = [_conv_bn_relu(c_in, c_out, kernel_size)]
        convs += [_conv_bn_relu(c_out, c_out, kernel_size) for _ in range(layers - 1)]
        self.body = nn.Sequential(*convs)
        self.c_out = c_out

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        res = x if residual is None else residual
        return self.body(x) + _match_channels(res, self.c_out)


class Encoder(nn.Module):
    """The shared encoder of the V-Net and the ResNet: returns the feature map of every level."""

    def __init__(self, in_channels: int = 1, base_channels: int = 8,
                 layers: Sequence[int] = ENCODER_LAYERS, kernel_size: int = 3) -> None:
        super().__init__()
        chans = [base_channels * 2**i for i in range(len(layers))]
        self.channels = chans
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        c_prev = in_channels
        for lvl, (c, n) in enumerate(zip(chans, layers)):
            self.blocks.append(ResidualBlock(c_prev if lvl == 0 else c, c, n, kernel_size))
            if lvl < len(chans) - 1:
                self.downs.append(nn.Sequential(nn.Conv3d(c, 2 * c, 2, stride=2),
                                                nn.BatchNorm3d(2 * c), nn.ReLU(inplace=True)))
            c_prev = c

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for lvl, block in enumerate(self.blocks):
            x = block(x)
            feats.append(x)
            if lvl < len(self.downs):
                x = self.downs[lvl](x)
        return feats


class VNet(nn.Module):
    """The paper's V-Net: input [N, 1, D, H, W] (D, H, W divisible by 8).

    ``forward`` returns ``(seg_logits [N, 1, D, H, W], cls_logit [N])`` where ``cls_logit`` is the
    global max of ``seg_logits``; ``torch.sigmoid(cls_logit)`` is the CMB probability.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 8,
                 encoder_layers: Sequence[int] = ENCODER_LAYERS,
                 decoder_layers: Sequence[int] = DECODER_LAYERS,
                 kernel_size: int = 3, up_kernel_size: int = 2) -> None:
        super().__init__()
        if len(decoder_layers) != len(encoder_layers) - 1:
            raise ValueError("decoder needs one block per encoder level except the bottom one")
        self.encoder = Encoder(in_channels, base_channels, encoder_layers, kernel_size)
        chans = self.encoder.channels
        self.ups = nn.ModuleList()
        self.dec = nn.ModuleList()
        for lvl, n in zip(range(len(chans) - 2, -1, -1), decoder_layers):
            c = chans[lvl]
            # stride 2 with kernel k: padding (k-2)//2... chosen so the output is exactly 2x.
            pad = (up_kernel_size - 2 + 1) // 2
            out_pad = 2 * pad - up_kernel_size + 2
            self.ups.append(nn.ConvTranspose3d(2 * c, c, up_kernel_size, stride=2, padding=pad,
                                               output_padding=out_pad))
            self.dec.append(ResidualBlock(2 * c, c, n, kernel_size))
        self.head = nn.Conv3d(chans[0], 1, 1)
        self.down_factor = 2 ** (len(chans) - 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if any(s % self.down_factor for s in x.shape[2:]):
            raise ValueError(f"patch size {tuple(x.shape[2:])} not divisible by {self.down_factor}")
        feats = self.encoder(x)
        h = feats[-1]
        for up, block, skip in zip(self.ups, self.dec, reversed(feats[:-1])):
            u = F.relu(up(h))
            h = block(torch.cat([u, skip], dim=1), residual=u)
        seg = self.head(h)
        cls = torch.amax(seg, dim=(1, 2, 3, 4))
        return seg, cls


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts in the paper's (Keras) convention.

    ``trainable``: all ``nn.Parameter`` elements; ``non_trainable``: batch-norm running means and
    variances (Keras counts these as non-trainable weights; PyTorch's ``num_batches_tracked``
    counter has no Keras counterpart and is not counted); ``total``: their sum.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    stats = sum(b.numel() for name, b in model.named_buffers()
                if name.endswith("running_mean") or name.endswith("running_var"))
    return {"trainable": trainable, "non_trainable": frozen + stats,
            "total": trainable + frozen + stats}


def vnet_loss(
    seg_logits: torch.Tensor,
    cls_logit: torch.Tensor,
    seg_target: torch.Tensor,
    cls_target: torch.Tensor,
    pos_weight: float = 1.0,
    seg_pos_weight: float | None = None,
) -> torch.Tensor:
    """The paper's training loss: weighted cross-entropy on the classification output plus weighted
    cross-entropy and Dice on the segmentation output (equal weights; the paper gives none).

    Args:
        seg_logits: [N, 1, D, H, W] logits; seg_target: same shape, {0, 1}.
        cls_logit: [N] logits; cls_target: [N], {0, 1} (1 = CMB).
        pos_weight: weight of the positive class in the classification cross-entropy.
        seg_pos_weight: weight of lesion voxels in the segmentation cross-entropy (default:
            ``pos_weight``).

    Dice is MONAI's ``DiceLoss(sigmoid=True, batch=True)`` (over the batch, so a patch without a
    lesion does not give an undefined Dice). MONAI's ``DiceCELoss`` is not used because its
    ``weight`` would also scale the Dice term.
    """
    from monai.losses import DiceLoss

    spw = pos_weight if seg_pos_weight is None else seg_pos_weight
    seg_target = seg_target.to(seg_logits.dtype)
    cls_target = cls_target.to(cls_logit.dtype)
    ce_cls = F.binary_cross_entropy_with_logits(
        cls_logit, cls_target, pos_weight=torch.tensor(pos_weight, dtype=cls_logit.dtype))
    ce_seg = F.binary_cross_entropy_with_logits(
        seg_logits, seg_target, pos_weight=torch.tensor(spw, dtype=seg_logits.dtype))
    dice = DiceLoss(sigmoid=True, batch=True)(seg_logits, seg_target)
    return ce_cls + ce_seg + dice
