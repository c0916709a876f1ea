"""Which torch device the product's torch steps run on: ``auto`` (CUDA when present, else CPU),
``cpu`` or ``cuda`` / ``cuda:N``.

The torch steps are the QSM chain's FFT work (Laplacian unwrapping, V-SHARP, TKD, STAR-QSM) and the
detection networks (ConvScreen, V-Net, ResNet). Everything else (brain mask, path-following
unwrapping, FRST, registration, DICOM) is numpy / scipy / SimpleITK on the CPU whatever is chosen.
On a GPU the QSM FFTs run in float32 like on the CPU, so results agree to float32 rounding of the
FFTs (tests/unit/test_device.py compares both where CUDA exists).
"""

from __future__ import annotations

import torch

from core.errors import ConfigError

CHOICES = ("auto", "cpu", "cuda")


def select_device(name: str | None) -> str:
    """The torch device string for ``name`` (``None`` = ``auto``).

    Raises:
        ConfigError: an unknown name, or CUDA asked for where torch sees no CUDA device.
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name} asked for, but torch {torch.__version__} sees no CUDA device "
                              "(use --device cpu or auto)")
        if ":" in name:
            idx = name.split(":", 1)[1]
            if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
                raise ConfigError(f"device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return name
    raise ConfigError(f"unknown device {name!r}: choose auto, cpu, cuda or cuda:N")
