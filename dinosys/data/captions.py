"""Captions for the embedded sets, written into their shards as ``<key>.txt``.

MNIST and digits get a caption from one of several templates per sample (chosen by a hash of
the set and index, so every build writes the same bytes), naming the digit as a numeral or a
word; the photos get a short description each. Zero-shot evaluation on the val folders (class
names "0".."9") then matches captions such as "a photo of the digit 3."; the templates file
``configs/clip/mnist_templates.txt`` holds the prompts the recipes evaluate with.
"""

from __future__ import annotations

import hashlib

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

DIGIT_TEMPLATES = (
    "a photo of the digit {d}.",
    "a handwritten {w}.",
    "the number {d}, written by hand.",
    "a black and white image of the digit {w}.",
    "a scanned handwritten number {d}.",
    "digit {d}",
    "a small picture of a handwritten {w}.",
    "the numeral {d} in white on a black background.",
    "a blurry photo of the number {w}.",
    "an image of the digit {d}.",
)

PHOTO_DESCRIPTIONS = {
    "china": "a traditional chinese temple with a pagoda roof under a blue sky.",
    "flower": "a close-up photo of a pink flower with green leaves.",
    "astronaut": "a portrait of an astronaut in a white space suit holding a helmet.",
    "chelsea": "a photo of a ginger tabby cat looking sideways.",
    "coffee": "a cup of coffee with milk foam on a saucer.",
    "rocket": "a rocket on a launch pad before lift-off.",
    "hubble_deep_field": "a telescope image of many distant galaxies in deep space.",
    "immunohistochemistry": "a microscope image of stained tissue cells in brown and blue.",
    "retina": "a medical photo of the retina at the back of a human eye.",
    "motorcycle_left": "a motorcycle parked in a cluttered room, seen from the left.",
    "motorcycle_right": "a motorcycle parked in a cluttered room, seen from the right.",
}


def digit_caption(set_name: str, index: int, label: int) -> str:
    """The caption of one labelled digit image (template picked by a hash of set and index)."""
    h = hashlib.sha256(f"caption:{set_name}:{index}".encode()).digest()
    template = DIGIT_TEMPLATES[int.from_bytes(h[:4], "big") % len(DIGIT_TEMPLATES)]
    return template.format(d=label, w=DIGIT_WORDS[label])


def photo_caption(name: str) -> str:
    """The description of a builtin photo (a generic one for a photo not listed)."""
    return PHOTO_DESCRIPTIONS.get(name, f"a photo of {name.replace('_', ' ')}.")


def builtin_caption(set_name: str, index: int, label: int | None, name: str) -> str:
    """The caption written beside a builtin image in its shard."""
    if label is None:
        return photo_caption(name)
    return digit_caption(set_name, index, label)
