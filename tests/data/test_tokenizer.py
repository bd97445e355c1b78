"""The CLIP BPE tokenizer: offline, and the same tokens as open_clip's."""

from __future__ import annotations

import pytest
import torch

from dinosys.data.tokenizer import (
    CONTEXT_LENGTH,
    EOT_ID,
    PAD_ID,
    SOT_ID,
    VOCAB_SIZE,
    ClipTokenizer,
    get_tokenizer,
)
from dinosys.errors import UserError

CORPUS = [
    "a photo of a cat.",
    "A handwritten digit 7, written in black ink!",
    "Café déjà vu — naïve façade; Ünïcödé",
    "日本語のテキスト 中文 한국어 Ελληνικά русский",
    "emoji 🐶🐱🚀 &amp; &lt;b&gt;bold&lt;/b&gt;",
    "  multiple   spaces\tand\nnew lines ",
    "It's, we'll, they'd, I'M, you've, she's",
    "3.14159 $100 #hashtag @user e-mail: a@b.c (parens) [brackets] {braces}",
    "mojibake: cafÃ© â€œquotedâ€\x9d",
    "",
    "x" * 400,
    " ".join(f"word{i}" for i in range(120)),
]


def test_specials_and_layout():
    tok = get_tokenizer()
    assert tok.vocab_size == VOCAB_SIZE == 49408
    assert (tok.sot_id, tok.eot_id, PAD_ID) == (SOT_ID, EOT_ID, 0) == (49406, 49407, 0)
    ids = tok(["a cat", "a dog on a mat"])
    assert ids.shape == (2, CONTEXT_LENGTH) and ids.dtype == torch.long
    assert ids[0, 0] == SOT_ID and ids[0, 3] == EOT_ID and (ids[0, 4:] == 0).all()
    assert tok.decode(ids[1]) == "a dog on a mat"


def test_long_text_is_cut_with_end_of_text_kept():
    tok = ClipTokenizer(context_length=16)
    row, cut = tok.row("one two three " * 20)
    assert cut and len(row) == 16 and row[0] == SOT_ID and row[-1] == EOT_ID
    ids = tok(["one two three " * 20])
    assert ids[0, -1] == EOT_ID and int(ids[0].argmax()) == 15


def test_bad_input():
    with pytest.raises(UserError, match="context length"):
        ClipTokenizer(context_length=1)
    with pytest.raises(UserError, match="not str"):
        get_tokenizer()([b"bytes"])  # type: ignore[list-item]


def test_same_tokens_as_open_clip():
    from dinosys.export.compat import import_torchvision

    import_torchvision()
    open_clip = pytest.importorskip("open_clip")
    ref = open_clip.get_tokenizer("ViT-B-32")
    ours = get_tokenizer()
    assert torch.equal(ours(CORPUS), ref(CORPUS))
    for n in (8, 16):
        assert torch.equal(ClipTokenizer(n)(CORPUS), ref(CORPUS, context_length=n))
