"""The tokenizer and chat template a GGUF file carries in its metadata (`tokenizer.ggml.*`),
built as a `tokenizers` Tokenizer that encodes as llama.cpp does:

- "gpt2": byte-level BPE from tokens + merges, split first by the regex of
  `tokenizer.ggml.pre` (llama.cpp's table: llama3, gpt-2, smollm families, qwen2); others refused;
- "llama": SentencePiece-style BPE from tokens + scores (merges ranked by the merged piece's
  score, as transformers' LlamaConverter builds them), byte fallback, "▁" for spaces and a
  space prefix (`tokenizer.ggml.add_space_prefix`, default true) at the start and after each
  special token, as llama.cpp's SPM tokenizer.

Control and user-defined tokens are matched whole in the text. BOS / EOS are added as the
metadata says (`add_bos_token` / `add_eos_token`; absent: llama.cpp's defaults).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from runtime.checkpoint.gguf_file import meta, open_gguf
from runtime.errors import CheckpointError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
           r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (split regexes, applied in turn, BOS added by default, whole words
# looked up first). The "smollm" family splits every digit off first, then GPT-2's split (as
# llama.cpp's table, and HF's Digits(individual_digits) + ByteLevel pre-tokenizers).
PRE = {**{name: ((_LLAMA3,), True, True) for name in ("llama3", "llama-v3", "llama-bpe",
                                                       "falcon3", "pixtral")},
       **{name: ((_GPT2,), False, False) for name in ("gpt-2", "phi-2")},
       **{name: ((r"\p{N}", _GPT2), False, False) for name in ("smollm", "starcoder",
                                                                "refact", "command-r")},
       "qwen2": ((_QWEN2,), False, False)}


class GGUFTokenizer:
    """encode / decode / vocab_size, as runtime.tokenizer's tokenizers."""

    def __init__(self, tok, bos: Optional[int], eos: Optional[int], add_bos: bool,
                 add_eos: bool, path: Path):
        self._tok, self.path = tok, path
        self.bos_id = bos if add_bos else None
        self._eos = eos if add_eos else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            ids = ([self.bos_id] if self.bos_id is not None else []) + ids + \
                ([self._eos] if self._eos is not None else [])
        return ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _vocab(reader) -> tuple[list[str], list[int]]:
    tokens = meta(reader, "tokenizer.ggml.tokens", kind=list)
    types = meta(reader, "tokenizer.ggml.token_type", [NORMAL] * len(tokens), list)
    if len(types) != len(tokens) or len(set(tokens)) != len(tokens):
        raise CheckpointError(f"{reader.data.filename}: tokenizer.ggml.tokens has "
                              f"{len(tokens) - len(set(tokens))} duplicates or token_type "
                              f"{len(types)} entries for {len(tokens)} tokens")
    return tokens, types


def _special_tokens(tok, tokens: list[str], types: list[int]) -> None:
    """Control and user-defined tokens are matched whole in the text (llama.cpp's special-token
    partition; transformers' added tokens)."""
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL and t])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED and t])


def _gpt2(reader, tokens: list[str], types: list[int]):
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers
    pre = meta(reader, "tokenizer.ggml.pre", "default", str)
    if pre not in PRE:
        raise CheckpointError(f"{reader.data.filename}: tokenizer.ggml.pre {pre!r} is not "
                              f"supported; supported: {', '.join(sorted(PRE))}")
    regexes, _, ignore_merges = PRE[pre]
    merges = [tuple(m.split(" ", 1)) for m in meta(reader, "tokenizer.ggml.merges", kind=list)]
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=ignore_merges)
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        *(pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in regexes),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list:
    """Every split of a normal piece into two pieces of the vocabulary, ranked by the merged
    piece's score (higher first; ties: longer left piece), as LlamaConverter does."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    merges = []
    for piece, i in ids.items():
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                 if piece[:k] in ids and piece[k:] in ids]
        local.sort(key=lambda m: (ids[m[0]], ids[m[1]]))
        merges.extend((scores[i], len(a), len(b), a, b) for a, b in local)
    merges.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [(a, b) for _, _, _, a, b in merges]


def _spm(reader, tokens: list[str], types: list[int]):
    import tokenizers
    from tokenizers import decoders, models, normalizers
    scores = meta(reader, "tokenizer.ggml.scores", kind=list)
    if len(scores) != len(tokens):
        raise CheckpointError(f"{reader.data.filename}: tokenizer.ggml.scores has {len(scores)} "
                              f"entries for {len(tokens)} tokens")
    unk = meta(reader, "tokenizer.ggml.unknown_token_id", None, int)
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, _spm_merges(tokens, scores, types),
                     unk_token=tokens[unk] if unk is not None and unk < len(tokens) else None,
                     fuse_unk=True, byte_fallback=BYTE in types)
    tok = tokenizers.Tokenizer(bpe)
    prefix = meta(reader, "tokenizer.ggml.add_space_prefix", True, bool)
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else [])
                                          + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def gguf_tokenizer(path) -> Optional[GGUFTokenizer]:
    """The tokenizer of a GGUF file, or None when it has no vocabulary."""
    reader = open_gguf(path)
    model = meta(reader, "tokenizer.ggml.model", None, str)
    if model is None or "tokenizer.ggml.tokens" not in reader.fields:
        return None
    if model not in ("gpt2", "llama"):
        raise CheckpointError(f"{path}: tokenizer.ggml.model {model!r} is not supported; "
                              f"supported: gpt2 (byte-level BPE), llama (SentencePiece BPE)")
    tokens, types = _vocab(reader)
    tok = _gpt2(reader, tokens, types) if model == "gpt2" else _spm(reader, tokens, types)
    _special_tokens(tok, tokens, types)
    default_bos = model == "llama" or PRE[meta(reader, "tokenizer.ggml.pre", "", str)][1]
    ids = [meta(reader, f"tokenizer.ggml.{k}_token_id", None, int) for k in ("bos", "eos")]
    for key, i in zip(("bos", "eos"), ids):
        if i is not None and not 0 <= i < len(tokens):
            raise CheckpointError(f"{path}: tokenizer.ggml.{key}_token_id {i} is outside the "
                                  f"vocabulary of {len(tokens)}")
    add_bos = meta(reader, "tokenizer.ggml.add_bos_token", default_bos, bool)
    add_eos = meta(reader, "tokenizer.ggml.add_eos_token", False, bool)
    return GGUFTokenizer(tok, ids[0], ids[1], add_bos and ids[0] is not None,
                         add_eos and ids[1] is not None, Path(path))


def gguf_chat_template(path) -> Optional[tuple[str, dict[str, str]]]:
    """(tokenizer.chat_template, {"bos_token": ..., "eos_token": ...}) of a GGUF file, for
    chat_template.ChatTemplate; None without a template."""
    reader = open_gguf(path)
    template = meta(reader, "tokenizer.chat_template", None, str)
    if template is None:
        return None
    tokens = meta(reader, "tokenizer.ggml.tokens", [], list)
    specials = {}
    for key in ("bos", "eos"):
        i = meta(reader, f"tokenizer.ggml.{key}_token_id", None, int)
        if i is not None and 0 <= i < len(tokens):
            specials[f"{key}_token"] = tokens[i]
    return template, specials
