"""DINOv2 objectives: DINO, iBOT and KoLeo losses and the teacher normalisations."""

from dinosys.losses.dino import DINOLossTerms, dino_loss, dino_loss_from_crops
from dinosys.losses.ibot import ibot_loss
from dinosys.losses.koleo import koleo_loss
from dinosys.losses.normalize import Centering, sinkhorn_knopp

__all__ = [
    "Centering",
    "DINOLossTerms",
    "dino_loss",
    "dino_loss_from_crops",
    "ibot_loss",
    "koleo_loss",
    "sinkhorn_knopp",
]
