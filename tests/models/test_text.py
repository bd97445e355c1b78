"""The causal text tower: open_clip layout and outputs, causality, bad input."""

from __future__ import annotations

import pytest
import torch

from dinosys.data.tokenizer import get_tokenizer
from dinosys.errors import UserError
from dinosys.models.text import TextConfig, TextTransformer

TEXTS = ["a photo of the digit 3", "the number seven, handwritten", "x", "a much longer caption "
         "about a colourful photo of a rocket on a launch pad at dawn"]


def _tower(**kw) -> TextTransformer:
    torch.manual_seed(0)
    return TextTransformer(TextConfig(width=64, layers=2, heads=4, **kw), embed_dim=32)


def test_loads_into_open_clip_and_matches():
    from dinosys.export.compat import import_torchvision

    import_torchvision()
    pytest.importorskip("open_clip")
    from open_clip.transformer import TextTransformer as OpenClipText

    ours = _tower().eval()
    ref = OpenClipText(context_length=77, width=64, heads=4, layers=2, output_dim=32).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ids = get_tokenizer()(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids), atol=1e-5, rtol=0)


def test_padding_and_later_tokens_do_not_change_the_embedding():
    tower = _tower().eval()
    ids = get_tokenizer()(TEXTS)
    with torch.no_grad():
        full = tower(ids)
        alone = torch.cat([tower(ids[i : i + 1]) for i in range(len(TEXTS))])
        trimmed = tower(ids[:, :30])
    torch.testing.assert_close(full, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(full, trimmed, atol=1e-5, rtol=0)


def test_bad_input():
    tower = _tower(context_length=8)
    with pytest.raises(UserError, match="longer than the context"):
        tower(torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(UserError, match="int64 token ids"):
        tower(torch.ones(2, 4))
    with pytest.raises(UserError, match="not divisible"):
        TextConfig(width=60, heads=8)
