"""CLIP tokenizer files for small vocabularies: every listed word one token, any other text by byte-level fallback.

Why: the tiny model and the toy model need a real `CLIPTokenizer` (the class SDXL uses) without downloading CLIP's
49 408-token vocabulary. `write_tokenizer_files` trains plain BPE on the words, so the merge ranks are consistent and
each word comes out as exactly one token. The tokenizer must be loaded with `model_max_length=77` (SDXL's), or
tokenization overflows.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

TOKENIZER_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to one printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def learn_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Plain BPE training on `words` until each is one token; ties break lexicographically (deterministic).

    Real training (rather than hand-chaining each word's letters) keeps the merge ranks consistent, so
    the tokenizer reassembles every listed word into exactly one token.
    """
    segmented = {word: [*word[:-1], word[-1] + END_OF_WORD] for word in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while True:
        pair_counts = Counter(
            (symbols[i], symbols[i + 1]) for symbols in segmented.values() for i in range(len(symbols) - 1)
        )
        if not pair_counts:
            return merges
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        for word, symbols in segmented.items():
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            segmented[word] = merged


def write_tokenizer_files(folder: Path, words: tuple[str, ...]) -> Path:
    """Write a CLIP-style `vocab.json` + `merges.txt`: byte alphabet, its `</w>` forms, merges that make each of
    `words` one token, specials."""
    alphabet = list(bytes_to_unicode().values())
    merges = learn_merges(words)
    tokens = alphabet + [symbol + END_OF_WORD for symbol in alphabet] + ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    return folder


def build_tokenizer(words: tuple[str, ...]) -> CLIPTokenizer:
    """A CLIPTokenizer over `words`, loaded from files written to a scratch folder (never looked up on the hub)."""
    with tempfile.TemporaryDirectory(prefix="waveft-tokenizer-") as scratch:
        files = write_tokenizer_files(Path(scratch), words)
        return CLIPTokenizer.from_pretrained(files, model_max_length=TOKENIZER_MAX_LENGTH, local_files_only=True)
