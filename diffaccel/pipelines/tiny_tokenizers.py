"""In-memory tokenizers of the tiny pipelines: the ``tokenizers``-backed transformers classes the real pipelines
use (byte-level BPE for CLIP, Unigram for T5/UMT5, byte-fallback BPE for Llama), built from a vocabulary in
code, with no file and no network access, so each tiny pipeline runs its own prompt-encoding code.

Used by the random tiny pipelines (:mod:`diffaccel.pipelines.tiny`) and the trained ones
(:mod:`diffaccel.pipelines.trained.components`, whose T5 tokenizer adds one piece per caption word).
"""

from __future__ import annotations

from typing import Sequence

TEXT_LEN = 32
"""Prompt length (tokens) of every tiny text encoder: the CLIP tokenizers' model_max_length and the T5
``max_sequence_length`` the tiny specs pass. Short, so the text tokens do not swamp the image tokens."""


def clip_tokenizer(model_max_length: int = TEXT_LEN):
    """A CLIP byte-level BPE tokenizer over the 256 byte symbols (no merges): every prompt tokenizes, byte by byte."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = TEXT_LEN, words: Sequence[str] = ()):
    """A T5 Unigram tokenizer over printable ASCII characters (``<pad>``=0, ``</s>``=1, ``<unk>``=2 as in T5).

    ``words``: whole-word pieces (``▁red``) placed after the specials and before the characters, so a caption
    of those words takes one token per word and any other text still tokenizes character by character.
    """
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in words]
    pieces += [(chr(c), -3.0) for c in range(33, 127)]
    pieces += [("\u2581" + chr(c), -2.5) for c in range(33, 127)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def llama_tokenizer(model_max_length: int = TEXT_LEN):
    """A Llama byte-fallback BPE tokenizer over printable ASCII (other characters fall back to byte tokens)."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "\u2581": 4}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in range(33, 127):
        vocab[chr(c)] = len(vocab)
        vocab["\u2581" + chr(c)] = len(vocab)
    return LlamaTokenizer(vocab=vocab, merges=[], pad_token="<pad>", model_max_length=model_max_length)
