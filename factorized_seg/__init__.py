"""factorized_seg: a DDPM whose denoiser is factorized into a shared encoder, a mask generator (softmax over K
regions) and one decoder shared across the regions; the masks segment images without labels (thesis ch. 2).

Never imports nerfstudio. Entry point: the ``factorized-seg`` CLI (``factorized_seg.cli``).
"""

from factorized_seg.model import DenoiserOutput, FactorizedUNet, FactorizedUNetConfig

__all__ = ["DenoiserOutput", "FactorizedUNet", "FactorizedUNetConfig"]
