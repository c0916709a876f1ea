"""QSM reconstruction as plain functions: mask -> Laplacian unwrap -> echo fit -> V-SHARP (or PDF, LBV)
-> STAR-QSM.

Every step is written by hand here because no permissively licensed Python library implements it
(STI Suite and its unofficial port are academic-only, qsm-forward is GPL-3.0, QSM.jl / QSM.rs are
other languages). The FFT-heavy steps run in ``torch.fft`` (float32) so the same code uses a GPU
where one is given via ``device``. The module docstrings name the paper and equations.

Entry point: :func:`core.qsm.pipeline.reconstruct`.
"""

from core.qsm.pipeline import QSMResult, reconstruct

__all__ = ["QSMResult", "reconstruct"]
