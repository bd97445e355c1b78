"""kNN top-5 is its own measurement: a true class with the second-largest vote is a top-5 hit
and a top-1 miss; a true class with the sixth-largest vote is a top-5 miss."""

from __future__ import annotations

import math

import torch

from dinosys.eval.knn import knn_accuracy, knn_classify


def unit(cos: float) -> list[float]:
    return [cos, math.sqrt(1.0 - cos * cos)]


# 6 classes (top-5 needs more than 5); the query is e0; class c's similarity falls with c
TRAIN = torch.tensor([unit(1.0), unit(1.0), unit(0.6), unit(-0.2), unit(-0.4), unit(-0.6),
                      unit(-0.8)])
LABELS = torch.tensor([0, 0, 1, 2, 3, 4, 5])
QUERY = torch.tensor([unit(1.0)])


def test_second_ranked_true_class_is_top5_not_top1() -> None:
    scores = knn_classify(TRAIN, LABELS, QUERY, n_classes=6, k=3, temperature=0.5)
    assert scores[0].argmax() == 0 and scores[0, 1] > 0 and scores[0, 2:].sum() == 0
    result = knn_accuracy(TRAIN, LABELS, QUERY, torch.tensor([1]), 6, ks=(3,), temperature=0.5)
    assert result["top1"] == {"3": 0.0} and result["top5"] == {"3": 1.0}
    result = knn_accuracy(TRAIN, LABELS, QUERY, torch.tensor([0]), 6, ks=(3,), temperature=0.5)
    assert result["top1"] == {"3": 1.0} and result["top5"] == {"3": 1.0}


def test_sixth_ranked_true_class_is_a_top5_miss() -> None:
    scores = knn_classify(TRAIN, LABELS, QUERY, n_classes=6, k=7, temperature=0.5)
    assert scores[0].argsort(descending=True).tolist() == [0, 1, 2, 3, 4, 5]
    result = knn_accuracy(TRAIN, LABELS, QUERY, torch.tensor([5]), 6, ks=(7,), temperature=0.5)
    assert result["top1"] == {"7": 0.0} and result["top5"] == {"7": 0.0}
    result = knn_accuracy(TRAIN, LABELS, QUERY, torch.tensor([4]), 6, ks=(7,), temperature=0.5)
    assert result["top1"] == {"7": 0.0} and result["top5"] == {"7": 1.0}
