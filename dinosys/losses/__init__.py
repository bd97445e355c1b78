"""DINOv2 objectives: DINO, iBOT and KoLeo losses and the teacher normalisations.

One SSL step, as DINOv2 composes them (B images per rank, crop-major batches)::

    dino_head, ibot_head = build_heads(cfg.heads, backbone.embed_dim)   # dinosys.models.heads
    dino_center = Centering(K)            # one per head output kind: CLS and masked patches
    ibot_center = Centering(K_ibot)

    # teacher (no grad) on the 2 global crops -> (2B, K) CLS logits, (M, K) masked-patch logits
    if centering == "centering":
        t_cls = dino_center.softmax_centered(t_cls_logits, teacher_temp)
        dino_center.update(t_cls_logits)            # all-reduced mean; async_op=True overlaps
        t_patch = ibot_center.softmax_centered(t_patch_logits, teacher_temp)
        ibot_center.update(t_patch_logits)
    else:  # "sinkhorn_knopp": global batch, per-rank row counts may differ
        t_cls = sinkhorn_knopp(t_cls_logits, teacher_temp, n_iterations)
        t_patch = sinkhorn_knopp(t_patch_logits, teacher_temp, n_iterations)

    dino = dino_loss(s_global_cls_logits, t_cls, s_local_cls_logits, student_temp=0.1)
    ibot = ibot_loss(s_patch_logits, t_patch, batch["mask_weights"], 2 * B, student_temp=0.1)
    koleo = sum(koleo_loss(c) for c in s_global_cls_tokens.chunk(2))  # per global crop
    loss = dino_w * dino.loss + ibot_w * ibot + koleo_w * koleo

Every function uses torch.distributed only when it is initialised (and for KoLeo only with
`distributed=True`). The DINO and iBOT losses are per-rank: with equal per-rank batch sizes
their rank average is the global-batch loss, which gradient averaging (FSDP/DDP) optimises.
"""

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
