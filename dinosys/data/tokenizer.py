"""The CLIP byte-pair-encoding tokenizer (vocabulary 49,408, context 77), offline.

Same tokens as OpenAI CLIP's and open_clip's ``SimpleTokenizer`` (``clean="lower"``): text is
repaired with ftfy, HTML-unescaped twice, whitespace-collapsed and lower-cased; split by the CLIP
pattern; each piece is byte-encoded and merged by rank. A row is
``[<start_of_text>, tokens..., <end_of_text>, 0, ...]``; a text longer than the context is cut
and its last kept position becomes ``<end_of_text>`` (so end-of-text pooling still finds it).
The merges file (MIT, OpenAI) ships in ``dinosys/data/assets/``.
"""

from __future__ import annotations

import functools
import gzip
import html
from pathlib import Path

import torch
from torch import Tensor

from dinosys.errors import UserError

VOCAB_FILE = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
PAD_ID = 0
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
SOT_ID = 49406
EOT_ID = 49407
_N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # byte symbols, byte symbols + </w>, two specials
_PATTERN = (r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
            r"|[^\s\p{L}\p{N}]+")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Reversible map from the 256 byte values to printable unicode characters (GPT-2/CLIP)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word[:-1], word[1:]))


def _import(module: str):  # type: ignore[no-untyped-def]
    try:
        return __import__(module)
    except ImportError as exc:
        raise UserError(f"the CLIP tokenizer needs the Python package '{module}' "
                        f"(pip install {module})") from exc


class ClipTokenizer:
    """Text -> (N, context_length) int64 token ids; ``decode`` goes back (lower-cased)."""

    def __init__(self, context_length: int = CONTEXT_LENGTH, vocab_file: Path = VOCAB_FILE):
        if context_length < 2:
            raise UserError(f"tokenizer context length must be >= 2 (start + end); "
                            f"got {context_length}")
        self._re = _import("regex")
        self._ftfy = _import("ftfy")
        try:
            lines = gzip.open(vocab_file).read().decode("utf-8").split("\n")
        except OSError as exc:
            raise UserError(f"cannot read the CLIP BPE vocabulary {vocab_file}: {exc}") from exc
        merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
        if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
            raise UserError(f"{vocab_file} is not the CLIP BPE merges file "
                            f"({len(merges)} merges, want {_N_MERGES})")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.pattern = self._re.compile(_PATTERN, self._re.IGNORECASE)
        self.context_length = context_length
        self.vocab_size = len(vocab)
        self.sot_id, self.eot_id = self.encoder[SOT_TOKEN], self.encoder[EOT_TOKEN]
        self._cache: dict[str, list[str]] = {SOT_TOKEN: [SOT_TOKEN], EOT_TOKEN: [EOT_TOKEN]}

    def clean(self, text: str) -> str:
        """ftfy repair, double HTML unescape, collapsed whitespace, lower case."""
        text = html.unescape(html.unescape(self._ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def bpe(self, piece: str) -> list[str]:
        """Merge the byte symbols of one pre-tokenised piece by rank."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        word = (*piece[:-1], piece[-1] + "</w>")
        pairs = _pairs(word)
        while pairs:
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            pairs = _pairs(word) if len(word) > 1 else set()
        out = list(word)
        if len(self._cache) < 100_000:
            self._cache[piece] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens and without truncation."""
        ids: list[int] = []
        for piece in self.pattern.findall(self.clean(text)):
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(symbols))
        return ids

    def decode(self, ids: list[int] | Tensor) -> str:
        """Text of ``ids`` (padding and special tokens dropped)."""
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        text = "".join(self.decoder[i] for i in ids
                       if i not in (PAD_ID, self.sot_id, self.eot_id))
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def row(self, text: str) -> tuple[list[int], bool]:
        """One text -> its id row (unpadded, at most ``context_length``) and whether it was cut."""
        ids = [self.sot_id, *self.encode(text), self.eot_id]
        if len(ids) <= self.context_length:
            return ids, False
        ids = ids[: self.context_length]
        ids[-1] = self.eot_id
        return ids, True

    def __call__(self, texts: str | list[str]) -> Tensor:
        """(N, context_length) int64 ids, zero-padded; long texts cut with end-of-text kept."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), PAD_ID, dtype=torch.long)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise UserError(f"tokenizer input {i} is {type(text).__name__}, not str")
            ids, _ = self.row(text)
            out[i, : len(ids)] = torch.tensor(ids)
        return out


@functools.cache
def get_tokenizer(context_length: int = CONTEXT_LENGTH) -> ClipTokenizer:
    """A shared tokenizer (building the 49k-entry tables takes ~0.3 s)."""
    return ClipTokenizer(context_length)
