"""Stage-II networks (core.detect.vnet, core.detect.resnet): shapes, parameter counts, loss, overfit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.detect.resnet import ResNet3D
from core.detect.vnet import PATCH_SIZE, VNet, count_parameters, vnet_loss

# The paper (Xia et al. 2023): V-Net 611,265 total = 610,097 trainable + 1,168 non-trainable;
# ResNet 452,529 total with 880 non-trainable.
PAPER_VNET = {"trainable": 610_097, "non_trainable": 1_168, "total": 611_265}
PAPER_RESNET = {"trainable": 451_649, "non_trainable": 880, "total": 452_529}


def test_vnet_parameter_count_equals_paper() -> None:
    counts = count_parameters(VNet())
    print("V-Net parameters:", counts)
    assert counts == PAPER_VNET


def test_vnet_text_reading_5x5x5_count() -> None:
    # The text's 5x5x5 kernels cannot give the paper's count: documented in vnet.py.
    counts = count_parameters(VNet(kernel_size=5, up_kernel_size=5))
    print("V-Net 5x5x5 parameters:", counts)
    assert counts["total"] == 2_977_489
    assert counts["non_trainable"] == 1_168


def test_resnet_parameter_count_equals_paper_total() -> None:
    counts = count_parameters(ResNet3D())
    print("ResNet parameters:", counts)
    assert counts == PAPER_RESNET


def test_vnet_forward_shapes_and_probability() -> None:
    torch.manual_seed(0)
    net = VNet().eval()
    x = torch.randn(2, 1, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE)
    with torch.no_grad():
        seg, cls = net(x)
    assert seg.shape == (2, 1, 32, 32, 32)
    assert cls.shape == (2,)
    torch.testing.assert_close(cls, seg.amax(dim=(1, 2, 3, 4)))
    p = torch.sigmoid(cls)
    assert bool(((p >= 0) & (p <= 1)).all())
    with pytest.raises(ValueError):
        net(torch.randn(1, 1, 20, 20, 20))
    net5 = VNet(kernel_size=5, up_kernel_size=5).eval()
    with torch.no_grad():
        assert net5(torch.randn(1, 1, 16, 16, 16))[0].shape == (1, 1, 16, 16, 16)


def test_resnet_forward() -> None:
    net = ResNet3D().eval()
    with torch.no_grad():
        out = net(torch.randn(3, 1, 32, 32, 32))
    assert out.shape == (3,)
    assert bool(torch.isfinite(out).all())


def _two_patches(n: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = np.meshgrid(*[np.arange(n, dtype=float)] * 3, indexing="ij")
    c = (n - 1) / 2
    sphere = (sum((gi - c) ** 2 for gi in g) <= 2.5**2).astype(np.float32)
    tube = (((g[0] - c) ** 2 + (g[1] - c) ** 2) <= 1.5**2).astype(np.float32)
    x = torch.from_numpy(np.stack([sphere, tube]))[:, None]
    seg = torch.from_numpy(np.stack([sphere, np.zeros_like(tube)]))[:, None]
    return x, seg, torch.tensor([1.0, 0.0])


def test_loss_value_and_tiny_overfit() -> None:
    torch.manual_seed(0)
    x, seg_t, cls_t = _two_patches()
    # Perfectly confident correct logits give a loss near 0; inverted ones a large loss.
    good = (seg_t * 2 - 1) * 20
    assert vnet_loss(good, good.amax(dim=(1, 2, 3, 4)), seg_t, cls_t).item() < 1e-3
    assert vnet_loss(-good, (-good).amax(dim=(1, 2, 3, 4)), seg_t, cls_t).item() > 10
    net = VNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        seg, cls = net(x)
        loss = vnet_loss(seg, cls, seg_t, cls_t, pos_weight=2.0)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print("overfit losses:", [round(v, 3) for v in losses])
    assert losses[-1] < 0.7 * losses[0]
