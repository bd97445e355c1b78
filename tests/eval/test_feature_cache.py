"""Features shared within a suite: one extraction per folder serves kNN's class tokens and the
linear probe's blocks, bit-identical to extracting them separately."""

from __future__ import annotations

from pathlib import Path

import torch

from dinosys.eval.feature_cache import FeatureNeed, merge_needs, shared_features
from dinosys.eval.features import extract_features
from dinosys.eval.images import load_image_folder
from dinosys.eval.models import EvalModel, frozen


def test_one_extraction_serves_narrower_requests(tiny_export: Path, small_digits) -> None:
    train, _ = small_digits
    model = EvalModel.load(str(tiny_export))
    with frozen(model.module):
        images = load_image_folder(train, model.image_size, model.mean, model.std)
        alone = extract_features(model.module, images, ["cls", "patch_mean"], 64)
        blocks1 = extract_features(model.module, images, ["blocks"], 64, n_blocks=1)
        with shared_features() as cache:
            again = load_image_folder(train, model.image_size, model.mean, model.std)
            assert load_image_folder(train, model.image_size, model.mean, model.std) is again
            wide = extract_features(model.module, again, ["blocks"], 64, n_blocks=2)
            cls = extract_features(model.module, again, ["cls", "patch_mean"], 64)
            one = extract_features(model.module, again, ["blocks"], 64, n_blocks=1)
            assert (cache.passes, cache.served) == (1, 2)
            # augmented features are never cached; a folder subset is another image set
            extract_features(model.module, again, ["cls"], 64,
                             transform=lambda batch, index: batch.flip(-1))
            extract_features(model.module, again.subset(range(10)), ["cls"], 64)
            assert (cache.passes, cache.served) == (2, 2)
        assert extract_features(model.module, images, ["blocks"], 64, n_blocks=2).keys() == \
            wide.keys()
    assert torch.equal(cls["cls"], alone["cls"])  # the class token after the final norm
    assert torch.equal(cls["patch_mean"], alone["patch_mean"])
    assert torch.equal(one["blocks_cls"], blocks1["blocks_cls"])
    assert torch.equal(one["blocks_patch_mean"], blocks1["blocks_patch_mean"])


def test_needs_are_merged_per_folder(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    merged = merge_needs([FeatureNeed(a, ["cls"]), FeatureNeed(b, ["image"]),
                          FeatureNeed(a, ["blocks"], {"n_blocks": 4}, 128),
                          FeatureNeed(a + "/", ["blocks"], {"n_blocks": 1})])
    assert [(n.folder, n.kinds, n.options, n.batch_size) for n in merged] == [
        (a, ["blocks"], {"n_blocks": 4}, 256), (b, ["image"], {}, 256)]
