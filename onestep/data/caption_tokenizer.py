"""A CLIPTokenizer whose BPE vocabulary holds a closed word list as whole tokens (no download: the files are written).

CLIP's BPE splits a word into characters, the last one carrying the end-of-word mark `</w>`, then applies merges by
rank, the lowest ranked pair first. The words are added one at a time: a word is split by the merges so far, and new
merges, ranked after all earlier ones, join its pieces left to right. An earlier word is unaffected (its own,
lower-ranked merges make it whole before any later merge applies); `write_caption_tokenizer` checks every word.
Single characters (with and without `</w>`) are in the vocabulary too, so unseen words degrade to characters.
"""

from __future__ import annotations

import json
import string
import tempfile
from collections.abc import Sequence
from pathlib import Path


BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The pieces BPE splits `word` into with merge ranks `ranks` (as CLIPTokenizer.bpe does)."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces[:-1], pieces[1:], strict=True))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def write_caption_tokenizer(folder: Path, words: Sequence[str], max_length: int) -> None:
    """vocab.json + merges.txt + tokenizer config for `words` into `folder`; raises if a word is not one token."""
    from transformers import CLIPTokenizer

    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(words)):
        pieces = _bpe(word, ranks)
        for piece in pieces[1:]:
            ranks.setdefault((pieces[0], piece), len(ranks))
            pieces[0] += piece
    merges = list(ranks)
    chars = sorted(set(string.ascii_lowercase) | {c for w in words for c in w})
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab = list(dict.fromkeys(vocab)) + [BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                              pad_token=EOS)
    broken = [w for w in words if len(tokenizer.tokenize(w)) != 1]
    if broken:
        raise RuntimeError(f"tokenizer splits {broken}")
    tokenizer.save_pretrained(folder)


def caption_tokenizer(words: Sequence[str], max_length: int):
    """A CLIPTokenizer covering `words` (built in a temporary folder, loaded from it)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_caption_tokenizer(Path(tmp), words, max_length)
        return CLIPTokenizer.from_pretrained(tmp)
