"""The reference method's ResNet comparator for stage II (Xia et al. 2023, "V-Net and ResNet Models").

The paper's ResNet is the V-Net's encoder (``core.detect.vnet.Encoder``: residual blocks of 1, 2, 3,
3 convolution layers with 8, 16, 32, 64 channels, batch norm and ReLU, 2x2x2 stride-2
convolutions for down-sampling; nine convolution layers) followed by a global pooling of the
bottom features and a dense layer to one logit. With 3x3x3 convolutions this has exactly the
paper's 452,529 parameters in total and 880 non-trainable ones (batch-norm statistics of 440
channels); the paper's "154,649 trainable" is then a digit transposition of 451,649 (= 452,529 -
880). The text's 5x5x5 convolutions are available as ``kernel_size=5``. The pooling type is not
stated; we use global average pooling (Keras' usual ``GlobalAveragePooling3D``; max pooling has the
same parameter count).

MONAI's ``monai.networks.nets.resnet10(spatial_dims=3, n_input_channels=1, num_classes=1)`` is a
generic 3-D ResNet with 14,356,929 parameters (64-512 channels, 7x7x7 stem): it is not the
paper's network, so it is not used here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from core.detect.vnet import ENCODER_LAYERS, Encoder


class ResNet3D(nn.Module):
    """Classifier of [N, 1, D, H, W] patches (D, H, W divisible by 8) to CMB logits [N]."""

    def __init__(self, in_channels: int = 1, base_channels: int = 8,
                 layers: Sequence[int] = ENCODER_LAYERS, kernel_size: int = 3,
                 pooling: str = "avg") -> None:
        super().__init__()
        if pooling not in ("avg", "max"):
            raise ValueError("pooling must be 'avg' or 'max'")
        self.encoder = Encoder(in_channels, base_channels, layers, kernel_size)
        self.pooling = pooling
        self.fc = nn.Linear(self.encoder.channels[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)[-1]
        h = h.mean(dim=(2, 3, 4)) if self.pooling == "avg" else torch.amax(h, dim=(2, 3, 4))
        return self.fc(h).squeeze(-1)
