"""CLIP (InfoNCE) and SigLIP losses: formulas, equal captions as positives, multi-rank equality."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dinosys.losses.clip import (
    LOGIT_SCALE_INIT,
    LOGIT_SCALE_MAX,
    clamp_logit_scale_,
    clip_loss,
    text_keys,
)
from dinosys.losses.siglip import siglip_loss

WORKER = Path(__file__).with_name("clip_dist_worker.py")


def _feats(n: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1),
            F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1))


def test_clip_loss_is_symmetric_cross_entropy():
    img, txt = _feats(6)
    s = torch.tensor(LOGIT_SCALE_INIT, dtype=torch.float64)
    logits = s.exp() * img @ txt.T
    labels = torch.arange(6)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(clip_loss(img, txt, s), want)
    # distinct keys are the plain diagonal
    torch.testing.assert_close(clip_loss(img, txt, s, keys=torch.arange(6) * 7), want)
    assert math.isclose(LOGIT_SCALE_INIT, 2.6593, abs_tol=1e-4)
    p = torch.nn.Parameter(torch.tensor(9.0))
    clamp_logit_scale_(p)
    assert math.isclose(p.item(), LOGIT_SCALE_MAX, rel_tol=1e-6)


def test_equal_captions_are_positives():
    # two classes, every caption repeated: images and texts of a class point the same way
    base = F.normalize(torch.randn(2, 8, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    img = txt = base[labels]
    s = torch.tensor(LOGIT_SCALE_MAX, dtype=torch.float64)
    tokens = torch.tensor([[49406, 320 + int(c), 49407, 0] for c in labels])
    keys = text_keys(tokens)
    assert keys[0] == keys[2] and keys[0] != keys[1]
    # as positives the perfect alignment costs nothing; as negatives it costs ~ln(3)
    assert clip_loss(img, txt, s, keys=keys).item() < 0.01
    assert clip_loss(img, txt, s).item() > math.log(3) - 0.05
    b = torch.tensor(-10.0, dtype=torch.float64)
    assert siglip_loss(img, txt, s, b, keys=keys).item() < siglip_loss(img, txt, s, b).item()
    # soft targets: uniform over the positives, written out
    img, txt = _feats(6, seed=1)
    logp_i = (s.exp() * img @ txt.T).log_softmax(1)
    logp_t = (s.exp() * txt @ img.T).log_softmax(1)
    pos = (labels[:, None] == labels[None, :]).double()
    tgt = pos / pos.sum(1, keepdim=True)
    ent = (tgt * tgt.clamp_min(1e-30).log()).sum(1).mean()
    want = ent - ((tgt * logp_i).sum(1).mean() + (tgt * logp_t).sum(1).mean()) / 2
    torch.testing.assert_close(clip_loss(img, txt, s, keys=keys), want)


def test_siglip_loss_formula():
    img, txt = _feats(5)
    s, b = torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-10.0,
                                                                          dtype=torch.float64)
    logits = s.exp() * img @ txt.T + b
    z = 2 * torch.eye(5, dtype=torch.float64) - 1
    want = -F.logsigmoid(z * logits).sum() / 5
    torch.testing.assert_close(siglip_loss(img, txt, s, b), want)


def test_text_keys_ignore_padding_length():
    a = torch.tensor([[49406, 11, 12, 49407, 0, 0]])
    assert text_keys(a) == text_keys(a[:, :4])
    assert text_keys(a) != text_keys(torch.tensor([[49406, 12, 11, 49407]]))


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4])
def test_losses_equal_full_matrix_across_ranks(repo_root, world):
    python_path = os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(world), str(WORKER)]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for r in range(world):
        assert f"rank {r}: OK" in out, out[-4000:]
