"""Zero-shot prompts, class embeddings and the zero-shot / retrieval metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinosys.errors import UserError
from dinosys.eval.text_prompts import (
    SIMPLE_TEMPLATES,
    class_text_embeddings,
    load_templates,
    retrieval_metrics,
    unique_texts,
    zeroshot_metrics,
)


def test_templates_file_and_bad_files(tmp_path):
    assert load_templates(None) == list(SIMPLE_TEMPLATES)
    good = tmp_path / "t.txt"
    good.write_text("# digits\na photo of the digit {}.\n\n  digit {}  \n")
    assert load_templates(good) == ["a photo of the digit {}.", "digit {}"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(UserError, match="no templates"):
        load_templates(empty)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("une photo d'un {} élégant\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_templates(latin1)
    noslot = tmp_path / "noslot.txt"
    noslot.write_text("a photo\n")
    with pytest.raises(UserError, match="exactly one"):
        load_templates(noslot)
    with pytest.raises(UserError, match="cannot read"):
        load_templates(tmp_path / "missing.txt")


def test_class_embeddings_average_normalised_templates():
    calls = []

    def encode(tokens):
        calls.append(tokens.shape[0])
        return tokens[:, :4].float() + 1.0

    def tokenizer(texts):
        return torch.tensor([[len(t), t.count("a"), 1, 2] for t in texts])

    emb = class_text_embeddings(encode, tokenizer, ["cat", "a dog"], ["a {}", "the {} here"])
    assert emb.shape == (2, 4) and calls == [2, 2]
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    rows = F.normalize(tokenizer(["a cat", "the cat here"]).float() + 1, dim=1).mean(0)
    torch.testing.assert_close(emb[0], F.normalize(rows, dim=0))


def test_zeroshot_metrics_top1_top5_per_class():
    classes = [str(i) for i in range(6)]
    emb = torch.eye(6)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 0])
    feats = torch.eye(6)[[0, 1, 2, 3, 4, 0, 0, 1]]  # sample 5 (class 5) and 7 (class 0) wrong
    out = zeroshot_metrics(feats + 0.01 * torch.arange(6.0), labels, emb, classes)
    assert out["metrics"]["top1"] == pytest.approx(6 / 8)
    assert out["per_class_recall"]["0"] == pytest.approx(2 / 3)
    assert out["per_class_recall"]["5"] == 0.0
    assert out["metrics"]["mean_per_class_recall"] == pytest.approx((2 / 3 + 4) / 6)
    # class 5 has the largest bias: it is in every top-5, so sample 5 is a top-5 hit
    assert out["metrics"]["top5"] >= 7 / 8


def test_retrieval_metrics_with_repeated_captions():
    captions = ["a one", "a two", "a one", "a three"]
    texts, of_image = unique_texts(captions)
    assert texts == ["a one", "a two", "a three"] and of_image.tolist() == [0, 1, 0, 2]
    txt = torch.eye(3)
    img = torch.eye(3)[[0, 1, 0, 1]]
    img[3, 2] = 0.5  # image 3 ("a three") looks more like "a two" than like its own text
    out = retrieval_metrics(img, txt, of_image, ks=(1, 2))
    assert out["image_to_text_R@1"] == pytest.approx(3 / 4)
    assert out["image_to_text_R@2"] == pytest.approx(1.0)
    # every text's nearest image carries it ("a one": images 0 and 2 are both positives)
    assert out["text_to_image_R@1"] == pytest.approx(1.0)
    img[3] = torch.tensor([0.0, 1.0, 0.0])  # now "a three" has no image near it
    assert retrieval_metrics(img, txt, of_image, ks=(1,))["text_to_image_R@1"] == \
        pytest.approx(2 / 3)
