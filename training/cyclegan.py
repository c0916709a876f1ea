"""CycleGAN augmentation of microbleed patches (Xia et al. 2023, "Data Augmentation Using CycleGAN", Fig. 2).

Domains (as in the paper): **A** = a real CMB QSM patch; **B** = a normal-tissue QSM patch
concatenated with a target CMB mask (2 channels). ``G_B2A`` synthesises a CMB patch from a normal
patch and a target mask (this is the augmentation: it writes a bleed of the mask's shape into
tissue that had none); ``G_A2B`` maps a CMB patch back to a normal patch plus its CMB mask.
``D_A`` and ``D_B`` are PatchGAN discriminators of five convolution layers.

Losses (paper text and Fig. 2):

* generators: adversarial mean squared error of the discriminators' probabilities against 1;
  cycle consistency (L1) A -> B -> A and B -> A -> B; the L1 "identity" terms between real A and
  the patch channel of fake B and between the patch channel of real B and fake A (they keep the
  contrast from being reversed); and a regression loss: ``G_A2B``'s mask output against the true
  mask of the real CMB (binary cross-entropy; our reading of Fig. 2's "regression loss"), also on
  the B -> A -> B cycle's mask. The mask regression is what ties the synthetic bleed to the target
  mask: ``G_A2B`` learns to segment bleeds, so the cycle forces ``G_B2A`` to paint one where the
  mask is.
* discriminators: binary cross-entropy (real 1, fake 0).

Sizes: the paper's generators are encoder-decoders with 24 to 384 features per level (GPU, 200
epochs). For a 2-core CPU the default here is features (8, 16, 32) with skip connections (a small
U-Net); ``--features`` takes the paper's widths. Both generators add their output to the input
patch (residual), which keeps the background anatomy, as the paper's Fig. 4 shows.

Normalisation: the stage II one (``training.shards.normalise_patches``), so synthetic patches are
in ppm like the real ones.

CLI::

    python -m training.cyclegan --data DIR [DIR ...] --out DIR [--epochs N] [--batch B] [--seed S]
        [--features 8 16 32] [--threads 2]

writes ``DIR/cyclegan.pt`` (generators + config) and ``DIR/cyclegan_log.json``. Training data:
real A = patches labelled ``cmb`` with their masks; real B = patches labelled ``other`` (not
``vessel``: the paper avoided vessels at the patch centre) with a CMB mask drawn from the real
ones and moved to the patch centre. ``python -m training.train ... --cyclegan DIR/cyclegan.pt
--synthetic N`` adds N synthetic positives to the training set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.shards import SCALE_PPM, load_shards, normalise_patches


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=1), nn.InstanceNorm3d(c_out, affine=True),
                         nn.LeakyReLU(0.2, inplace=True))


class Generator3D(nn.Module):
    """Encoder-decoder (U-Net style) generator on [N, in_ch, D, H, W] (D, H, W divisible by
    2^(levels-1)). Output channel 0 is ``input channel 0 + residual``; further channels (mask
    logits) are plain outputs."""

    def __init__(self, in_ch: int, out_ch: int, features: Sequence[int] = (8, 16, 32)) -> None:
        super().__init__()
        f = list(features)
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        c = in_ch
        for i, n in enumerate(f):
            self.enc.append(_block(c, n))
            if i < len(f) - 1:
                self.down.append(nn.Conv3d(n, n, 2, stride=2))
            c = n
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(len(f) - 1, 0, -1):
            self.up.append(nn.ConvTranspose3d(f[i], f[i - 1], 2, stride=2))
            self.dec.append(_block(2 * f[i - 1], f[i - 1]))
        self.head = nn.Conv3d(f[0], out_ch, 1)
        self.factor = 2 ** (len(f) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for i, blk in enumerate(self.enc):
            h = blk(h)
            if i < len(self.down):
                skips.append(h)
                h = self.down[i](h)
        for up, blk, s in zip(self.up, self.dec, reversed(skips)):
            h = blk(torch.cat([up(h), s], 1))
        out = self.head(h)
        return torch.cat([out[:, :1] + x[:, :1], out[:, 1:]], 1)


class PatchDiscriminator3D(nn.Module):
    """PatchGAN discriminator, five convolution layers (three stride-2 4x4x4, two 3x3x3);
    returns a logit map."""

    def __init__(self, in_ch: int, features: int = 8) -> None:
        super().__init__()
        f = features
        self.net = nn.Sequential(
            nn.Conv3d(in_ch, f, 4, 2, 1), nn.LeakyReLU(0.2, True),
            nn.Conv3d(f, 2 * f, 4, 2, 1), nn.InstanceNorm3d(2 * f, affine=True), nn.LeakyReLU(0.2, True),
            nn.Conv3d(2 * f, 4 * f, 4, 2, 1), nn.InstanceNorm3d(4 * f, affine=True), nn.LeakyReLU(0.2, True),
            nn.Conv3d(4 * f, 4 * f, 3, 1, 1), nn.InstanceNorm3d(4 * f, affine=True), nn.LeakyReLU(0.2, True),
            nn.Conv3d(4 * f, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CycleGAN:
    """The two generators, two discriminators and their Adam optimisers (lr 2e-4, betas 0.5/0.999,
    the CycleGAN defaults of Zhu et al. 2017)."""

    def __init__(self, features: Sequence[int] = (8, 16, 32), d_features: int = 8, lr: float = 2e-4,
                 lambda_cycle: float = 10.0, lambda_identity: float = 2.0, lambda_mask: float = 5.0,
                 seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.config = {"features": list(features), "d_features": d_features, "lr": lr,
                       "lambda_cycle": lambda_cycle, "lambda_identity": lambda_identity,
                       "lambda_mask": lambda_mask, "seed": seed}
        self.g_a2b = Generator3D(1, 2, features)
        self.g_b2a = Generator3D(2, 1, features)
        self.d_a = PatchDiscriminator3D(1, d_features)
        self.d_b = PatchDiscriminator3D(2, d_features)
        gp = list(self.g_a2b.parameters()) + list(self.g_b2a.parameters())
        dp = list(self.d_a.parameters()) + list(self.d_b.parameters())
        self.opt_g = torch.optim.Adam(gp, lr=lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(dp, lr=lr, betas=(0.5, 0.999))

    def step(self, real_a: torch.Tensor, mask_a: torch.Tensor, normal_b: torch.Tensor,
             target_mask: torch.Tensor) -> dict:
        """One optimisation step on tensors [N, 1, D, H, W] (patches normalised, masks {0, 1});
        returns the losses as floats."""
        c = self.config
        real_b = torch.cat([normal_b, target_mask], 1)
        # generators
        fb = self.g_a2b(real_a)  # [patch, mask logit]
        fake_b = torch.cat([fb[:, :1], torch.sigmoid(fb[:, 1:])], 1)
        fake_a = self.g_b2a(real_b)
        rec_a = self.g_b2a(fake_b)
        rb = self.g_a2b(fake_a)
        pa = torch.sigmoid(self.d_a(fake_a))
        pb = torch.sigmoid(self.d_b(fake_b))
        adv = F.mse_loss(pa, torch.ones_like(pa)) + F.mse_loss(pb, torch.ones_like(pb))
        cyc = F.l1_loss(rec_a, real_a) + F.l1_loss(rb[:, :1], normal_b)
        idt = F.l1_loss(fb[:, :1], real_a) + F.l1_loss(fake_a, normal_b)
        msk = (F.binary_cross_entropy_with_logits(fb[:, 1:], mask_a)
               + F.binary_cross_entropy_with_logits(rb[:, 1:], target_mask))
        g_loss = adv + c["lambda_cycle"] * cyc + c["lambda_identity"] * idt + c["lambda_mask"] * msk
        self.opt_g.zero_grad()
        g_loss.backward()
        self.opt_g.step()
        # discriminators (binary cross-entropy)
        def d_loss(d: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
            lr_, lf = d(real), d(fake.detach())
            return (F.binary_cross_entropy_with_logits(lr_, torch.ones_like(lr_))
                    + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf)))
        dl = d_loss(self.d_a, real_a, fake_a) + d_loss(self.d_b, real_b, fake_b)
        self.opt_d.zero_grad()
        dl.backward()
        self.opt_d.step()
        return {k: float(v.detach()) for k, v in (("g", g_loss), ("adv", adv), ("cycle", cyc), ("identity", idt),
                                                  ("mask", msk), ("d", dl))}

    def save(self, path: str, extra: dict | None = None) -> None:
        torch.save({"config": self.config, "g_b2a": self.g_b2a.state_dict(), "g_a2b": self.g_a2b.state_dict(),
                    **(extra or {})}, path)


def centre_mask(mask: np.ndarray) -> np.ndarray:
    """Move a lesion mask so that its centroid sits at the patch centre (integer shift, zero fill)."""
    m = np.asarray(mask, np.uint8)
    idx = np.argwhere(m > 0)
    if len(idx) == 0:
        return m.copy()
    shift = np.array(m.shape) // 2 - np.round(idx.mean(0)).astype(int)
    out = np.zeros_like(m)
    new = idx + shift
    ok = np.all((new >= 0) & (new < np.array(m.shape)), axis=1)
    out[tuple(new[ok].T)] = 1
    return out


def synthesise(g_b2a: nn.Module, normal_patches: np.ndarray, masks: np.ndarray, batch: int = 16) -> np.ndarray:
    """Synthetic CMB patches (ppm) from normal-tissue patches (ppm) [N, D, H, W] and target masks."""

    g_b2a.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(normal_patches), batch):
            x = torch.from_numpy(normalise_patches(normal_patches[s:s + batch]))[:, None]
            m = torch.from_numpy(np.asarray(masks[s:s + batch], np.float32))[:, None]
            out.append(g_b2a(torch.cat([x, m], 1))[:, 0].numpy() * SCALE_PPM)
    return np.concatenate(out).astype(np.float32)


def _domains(data: dict) -> tuple[np.ndarray, np.ndarray]:
    a_idx = np.flatnonzero(data["labels"] == "cmb")
    b_idx = np.flatnonzero(data["labels"] == "other")
    if len(a_idx) == 0 or len(b_idx) == 0:
        raise RuntimeError("CycleGAN training needs candidates labelled 'cmb' and 'other'")
    return a_idx, b_idx


def load_generator(ckpt: str) -> Generator3D:
    state = torch.load(ckpt, map_location="cpu")
    g = Generator3D(2, 1, state["config"]["features"])
    g.load_state_dict(state["g_b2a"])
    g.eval()
    return g


def synthesise_from_shards(ckpt: str, train: dict, n: int, seed: int = 0) -> tuple[dict, dict]:
    """Add ``n`` synthetic CMB patches to a ``training.shards.load_shards`` dict: normal patches
    (label ``other``) + real CMB masks moved to the centre, through the checkpoint's ``G_B2A``.
    The synthetic rows are labelled ``cmb_synthetic`` (y = 1). Returns (new dict, info)."""
    rng = np.random.default_rng([seed, 4242])
    a_idx, b_idx = _domains(train)
    bi = rng.choice(b_idx, n, replace=len(b_idx) < n)
    ai = rng.choice(a_idx, n, replace=True)
    masks = np.stack([centre_mask(train["masks"][i]) for i in ai])
    fake = synthesise(load_generator(ckpt), train["patches"][bi].astype(np.float32), masks)
    out = dict(train)
    out["patches"] = np.concatenate([train["patches"], fake.astype(train["patches"].dtype)])
    out["masks"] = np.concatenate([train["masks"], masks])
    out["cubes"] = np.concatenate([train["cubes"], train["cubes"][bi]])  # unused by the patch models
    out["labels"] = np.concatenate([train["labels"], np.array(["cmb_synthetic"] * n)])
    out["y"] = np.concatenate([train["y"], np.ones(n, np.float32)])
    out["subject"] = np.concatenate([train["subject"], train["subject"][bi]])
    return out, {"checkpoint": os.path.abspath(ckpt), "n": int(n), "seed": int(seed)}


def train_cyclegan(data: dict, *, epochs: int = 10, batch: int = 8, seed: int = 0,
                   features: Sequence[int] = (8, 16, 32), steps_per_epoch: int | None = None,
                   lr: float = 2e-4, progress: bool = True) -> tuple[CycleGAN, list[dict]]:
    """Fit the CycleGAN on a ``load_shards`` dict (or any dict with ``patches``, ``masks``,
    ``labels``); returns the model and the per-epoch mean losses."""

    rng = np.random.default_rng([seed, 99])
    a_idx, b_idx = _domains(data)
    gan = CycleGAN(features=features, lr=lr, seed=seed)
    spe = steps_per_epoch or max(1, int(np.ceil(len(a_idx) / batch)))
    log = []
    for ep in range(1, epochs + 1):
        t0 = time.perf_counter()
        acc: dict[str, list[float]] = {}
        for _ in range(spe):
            ai = rng.choice(a_idx, batch, replace=len(a_idx) < batch)
            bi = rng.choice(b_idx, batch, replace=len(b_idx) < batch)
            mi = rng.choice(a_idx, batch, replace=len(a_idx) < batch)
            ra = torch.from_numpy(normalise_patches(data["patches"][ai]))[:, None]
            ma = torch.from_numpy(data["masks"][ai].astype(np.float32))[:, None]
            nb = torch.from_numpy(normalise_patches(data["patches"][bi]))[:, None]
            tm = torch.from_numpy(np.stack([centre_mask(data["masks"][i]) for i in mi]).astype(np.float32))[:, None]
            for k, v in gan.step(ra, ma, nb, tm).items():
                acc.setdefault(k, []).append(v)
        rec = {"epoch": ep, **{k: float(np.mean(v)) for k, v in acc.items()},
               "seconds": time.perf_counter() - t0}
        log.append(rec)
        if progress:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
    return gan, log


def main(argv: Sequence[str] | None = None) -> int:

    ap = argparse.ArgumentParser(prog="python -m training.cyclegan", description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--features", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = load_shards(a.data)
    gan, log = train_cyclegan(data, epochs=a.epochs, batch=a.batch, seed=a.seed, features=a.features, lr=a.lr)
    os.makedirs(a.out, exist_ok=True)
    gan.save(os.path.join(a.out, "cyclegan.pt"), {"data": [os.path.abspath(d) for d in a.data]})
    with open(os.path.join(a.out, "cyclegan_log.json"), "w") as fh:
        json.dump({"config": gan.config, "data": a.data, "log": log}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
