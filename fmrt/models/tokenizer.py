"""Text tokenizers built on the ``tokenizers`` library.

* ``WordTokenizer``: a word-level vocabulary (ShapesWorld's closed vocabulary: under 128 ids, so
  the text tower's embedding table stays tiny). Lower-cases, splits on whitespace and
  punctuation, and splits digits one by one so pixel coordinates (``<point x="12" ...>``) need
  only ten number tokens.
* ``CLIPBPETokenizer``: OpenAI CLIP's byte-level BPE from a user-supplied ``vocab.json`` +
  ``merges.txt`` (the files of ``openai/clip-vit-base-patch32``); same ids as
  ``transformers.CLIPTokenizer``.

Both share one interface: ``encode(text) -> list[int]`` (with start/end tokens, truncated to the
context length with end-of-text kept last), ``__call__(texts) -> LongTensor [T, L]`` padded with
``pad_token_id``, ``decode(ids)``, ``save(dir)`` and ``load_tokenizer(dir)``.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional, Sequence, Union

import torch

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_META_FILE = "tokenizer_config.json"

# ShapesWorld special tokens; the ids are fixed because model configs name them (eot_token_id=2).
WORD_SPECIALS = ("<pad>", "<sot>", "<eot>", "<unk>")


class TokenizerError(ValueError):
    """Bad tokenizer input (not a string, unreadable vocabulary files, ...)."""


class _Base:
    kind: str = ""
    _pad_is_special: bool = True  # pad id is a dedicated token that decode drops everywhere

    def __init__(self, tk, *, context_length: int, sot_token: str, eot_token: str,
                 pad_token_id: int) -> None:
        self._tk = tk
        self.context_length = int(context_length)
        self.sot_token_id = tk.token_to_id(sot_token)
        self.eot_token_id = tk.token_to_id(eot_token)
        if self.sot_token_id is None or self.eot_token_id is None:
            raise TokenizerError(f"vocabulary lacks {sot_token!r} or {eot_token!r}")
        self.pad_token_id = int(pad_token_id)
        self._sot_token, self._eot_token = sot_token, eot_token

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size()

    def _check(self, texts: Union[str, Sequence[str]]) -> List[str]:
        if isinstance(texts, str):
            return [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TokenizerError("texts must be a string or a list of strings")
        return list(texts)

    def encode(self, text: str, context_length: Optional[int] = None) -> List[int]:
        """Token ids ``[sot, ..., eot]``, at most ``context_length`` long (eot kept last)."""
        n = context_length or self.context_length
        if not isinstance(text, str):  # a list would silently encode only its first string
            raise TokenizerError(f"encode takes one string, got {type(text).__name__}; "
                                 "use encode_batch or __call__ for several")
        ids = self._tk.encode(text, add_special_tokens=False).ids
        ids = [self.sot_token_id] + ids[: n - 2] + [self.eot_token_id]
        return ids

    def encode_batch(self, texts: Sequence[str], context_length: Optional[int] = None
                     ) -> List[List[int]]:
        n = context_length or self.context_length
        encs = self._tk.encode_batch(self._check(texts), add_special_tokens=False)
        return [[self.sot_token_id] + e.ids[: n - 2] + [self.eot_token_id] for e in encs]

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None
                 ) -> torch.Tensor:
        """``T x context_length`` int64 ids, right-padded with ``pad_token_id``."""
        n = context_length or self.context_length
        rows = self.encode_batch(self._check(texts), n)
        out = torch.full((len(rows), n), self.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        else:  # a row without eot: drop its right padding
            while ids and ids[-1] == self.pad_token_id:
                ids.pop()
        specials = {self.sot_token_id, self.eot_token_id}
        if self._pad_is_special:  # CLIP pads with id 0, which is also the real token "!"
            specials.add(self.pad_token_id)
        return self._decode([i for i in ids if i not in specials])

    def _decode(self, ids: List[int]) -> str:
        return self._tk.decode(ids)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tk.token_to_id(token)

    def _meta(self) -> dict:
        return {"kind": self.kind, "context_length": self.context_length,
                "sot_token": self._sot_token, "eot_token": self._eot_token,
                "pad_token_id": self.pad_token_id}

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self._tk.save(os.path.join(directory, TOKENIZER_FILE))
        with open(os.path.join(directory, TOKENIZER_META_FILE), "w") as f:
            json.dump(self._meta(), f, indent=2)


class WordTokenizer(_Base):
    kind = "word"

    @classmethod
    def build(cls, words: Iterable[str], *, context_length: int = 32) -> "WordTokenizer":
        """A closed word-level vocabulary: the four specials, digits ``0``-``9``, then ``words``
        (deduplicated, lower-cased, order kept)."""
        from tokenizers import Tokenizer, models

        vocab: dict = {}
        for w in list(WORD_SPECIALS) + [str(d) for d in range(10)] + [w.lower() for w in words]:
            vocab.setdefault(w, len(vocab))
        tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        cls._configure(tk)
        return cls(tk, context_length=context_length)

    @staticmethod
    def _configure(tk) -> None:
        from tokenizers import normalizers, pre_tokenizers

        tk.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        # Whitespace = \w+|[^\w\s]+ ; Digits(individual) splits "12" into "1", "2".
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated"),
            pre_tokenizers.Digits(individual_digits=True)])

    def __init__(self, tk, *, context_length: int = 32, **_) -> None:
        super().__init__(tk, context_length=context_length, sot_token="<sot>", eot_token="<eot>",
                         pad_token_id=tk.token_to_id("<pad>"))
        self.unk_token_id = tk.token_to_id("<unk>")

    def unknown_words(self, text: str) -> List[str]:
        """Words of ``text`` outside the vocabulary (they would map to ``<unk>``)."""
        if not isinstance(text, str):
            raise TokenizerError(f"expected a string, got {type(text).__name__}")
        enc = self._tk.encode(text, add_special_tokens=False)
        # enc.tokens holds "<unk>" for these; the offsets give back the words themselves
        return [text[a:b] for (a, b), i in zip(enc.offsets, enc.ids) if i == self.unk_token_id]

    def _decode(self, ids: List[int]) -> str:
        # Rejoin words with spaces, glue punctuation/digits the way ShapesWorld writes them.
        # Ids past the vocabulary (a model's embedding table is padded to a multiple of 32) read
        # as <unk>.
        toks = [self._tk.id_to_token(i) or "<unk>" for i in ids]
        # a coordinate token (fmrt.data.vlm_data.build_vlm_tokenizer) reads as its number
        toks = [t[4:-1] if t.startswith("<loc") and t[4:-1].isdigit() else t for t in toks]
        out = ""
        in_quotes = False  # a closing quote is followed by a space (x="12" y="40")
        for t in toks:
            if not out:
                out = t
            elif t.isdigit() and out[-1].isdigit():
                out += t
            elif t == '"':  # an opening quote follows "=" (x="12"); a closing one is glued
                out += t if in_quotes or out[-1] == "=" else " " + t
            elif t in {".", ",", "?", "!", ">", "="} or out[-1] in {"<", "="} or (
                    out[-1] == '"' and in_quotes):
                out += t
            else:
                out += " " + t
            if t == '"':
                in_quotes = not in_quotes
        return out


class CLIPBPETokenizer(_Base):
    """OpenAI CLIP's BPE: NFC + lower-case + whitespace cleanup, CLIP's split regex, byte-level
    alphabet, ``</w>`` end-of-word suffix; ``<|startoftext|>``/``<|endoftext|>``; context 77,
    padded with 0 like OpenAI's ``clip.tokenize`` (the text tower pools at the first eot, so the
    pad id never matters)."""

    kind = "clip_bpe"
    _pad_is_special = False  # pad id 0 is "!"; padding only ever follows eot
    # CLIP's pattern (simple_tokenizer.py) minus the special tokens, which tokenizers handles.
    SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

    @classmethod
    def from_files(cls, vocab_file: str, merges_file: str, *, context_length: int = 77
                   ) -> "CLIPBPETokenizer":
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

        for f in (vocab_file, merges_file):
            if not os.path.isfile(f):
                raise TokenizerError(f"CLIP BPE file not found: {f}")
        try:
            bpe = models.BPE.from_file(vocab_file, merges_file, unk_token="<|endoftext|>",
                                       end_of_word_suffix="</w>", continuing_subword_prefix="",
                                       fuse_unk=False)
        except Exception as e:  # malformed json / merges
            raise TokenizerError(f"cannot read CLIP BPE files: {e}") from e
        tk = Tokenizer(bpe)
        tk.normalizer = normalizers.Sequence([
            normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(cls.SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
        return cls(tk, context_length=context_length)

    def __init__(self, tk, *, context_length: int = 77, pad_token_id: int = 0, **_) -> None:
        super().__init__(tk, context_length=context_length, sot_token="<|startoftext|>",
                         eot_token="<|endoftext|>", pad_token_id=pad_token_id)

    def _decode(self, ids: List[int]) -> str:
        return self._tk.decode(ids).replace("</w>", " ").strip()


def load_tokenizer(directory: str):
    """Load a tokenizer saved with ``save(directory)``."""
    from tokenizers import Tokenizer

    meta_path = os.path.join(directory, TOKENIZER_META_FILE)
    tk_path = os.path.join(directory, TOKENIZER_FILE)
    if not (os.path.isfile(meta_path) and os.path.isfile(tk_path)):
        raise TokenizerError(f"{directory}: no {TOKENIZER_FILE} + {TOKENIZER_META_FILE}")
    with open(meta_path) as f:
        meta = json.load(f)
    cls = {"word": WordTokenizer, "clip_bpe": CLIPBPETokenizer}.get(meta.get("kind"))
    if cls is None:
        raise TokenizerError(f"{meta_path}: unknown tokenizer kind {meta.get('kind')!r}")
    return cls(Tokenizer.from_file(tk_path), context_length=meta["context_length"],
               pad_token_id=meta.get("pad_token_id", 0))
