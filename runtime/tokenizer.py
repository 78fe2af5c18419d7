"""Tokenizers: SentencePiece `tokenizer.model` (Grok-1, Llama 2, Mistral, Mixtral), a Hugging Face
`tokenizer.json` (Llama 3, SmolLM, Qwen, ...: read with the `tokenizers` library) or a pickled
minbpe-style tokenizer (Palm; minbpe.py), with incremental decoding for streaming.

Special tokens are added as the tokenizer itself says, so that a text's ids equal transformers'
`AutoTokenizer.from_pretrained(folder)(text).input_ids`: a tokenizer.json adds what its
post-processor adds (a TemplateProcessing with BOS first, or nothing for byte-level BPE;
transformers 5 builds its fast tokenizers from that and ignores `add_bos_token`, see
scripts/make_tokenizer_fixtures.py); a SentencePiece model of a Hugging Face folder gets BOS
unless tokenizer_config.json says `add_bos_token: false` (`bos_id`); Grok-1's gets none.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import sentencepiece

from runtime.errors import RuntimeInputError
from runtime.minbpe import MinBPETokenizer, is_pickle


class Tokenizer:
    """SentencePiece model."""

    def __init__(self, path: str | Path, bos_id: int | None = None):
        path = Path(path)
        self.bos_id = bos_id
        self._specials: re.Pattern | None = None  # control pieces' spellings, on first use
        if not path.is_file():
            raise RuntimeInputError(f"tokenizer file not found: {path}")
        self.path = path
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(path.read_bytes())
        except (RuntimeError, OSError) as e:
            raise RuntimeInputError(f"{path} is not a SentencePiece model: "
                                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                from None

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The text's ids, BOS first when the tokenizer adds one and add_special_tokens (chat
        templates render their own BOS: they encode with False). Control and unknown pieces
        written out in the text (`<s>`, `</s>`, `<unk>`) are their ids, as transformers reads
        them, not spelled with ordinary pieces."""
        ids: list[int] = []
        for i, part in enumerate(self._special_pattern().split(text) if text else ()):
            if i % 2:
                ids.append(self._sp.PieceToId(part))
            elif part:
                ids.extend(self._sp.EncodeAsIds(part))
        return [self.bos_id] + ids if self.bos_id is not None and add_special_tokens else ids

    def _special_pattern(self) -> re.Pattern:
        if self._specials is None:
            pieces = sorted((self._sp.IdToPiece(i) for i in range(self.vocab_size)
                             if self._sp.IsControl(i) or self._sp.IsUnknown(i)), key=len,
                            reverse=True)
            pieces = [piece for piece in pieces if piece]
            self._specials = re.compile(
                "(" + "|".join(map(re.escape, pieces)) + ")" if pieces else "(?!)")
        return self._specials

    def decode(self, ids) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])


class JsonTokenizer:
    """Hugging Face `tokenizer.json` (byte-level BPE and friends) through `tokenizers`."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise RuntimeInputError(f"tokenizer file not found: {path}")
        import tokenizers
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exception subclasses
            raise RuntimeInputError(f"{path} is not a tokenizer.json: "
                                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                from None
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The text's ids with the special tokens the post-processor adds (BOS or none), or
        without them (add_special_tokens False: what chat templates, which render their own,
        use). Special tokens written out in the text are their ids either way."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | Path, bos_id: int | None = None):
    """A tokenizer by file type: `*.json` through `tokenizers` (its own special tokens), a
    pickle as a minbpe-style tokenizer (Palm's `Encoder.save`, minbpe.py; read safely), else
    SentencePiece with `bos_id` prepended (None: nothing)."""
    path = Path(path)
    if path.suffix == ".json":
        return JsonTokenizer(path)
    return MinBPETokenizer(path) if is_pickle(path) else Tokenizer(path, bos_id)


def sentencepiece_adds_bos(folder: Path) -> bool:
    """Whether a Hugging Face folder's SentencePiece tokenizer prepends BOS: its
    tokenizer_config.json's `add_bos_token`, true when absent (LlamaTokenizer's default)."""
    settings = Path(folder) / "tokenizer_config.json"
    if not settings.is_file():
        return True
    try:
        values = json.loads(settings.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RuntimeInputError(f"{settings} is not readable JSON: "
                                f"{str(e) or type(e).__name__}") from None
    if not isinstance(values, dict):
        raise RuntimeInputError(f"{settings}: expected a JSON object")
    adds = values.get("add_bos_token", True)
    if not isinstance(adds, bool):
        raise RuntimeInputError(f"{settings}: add_bos_token must be true or false, got "
                                f"{adds!r:.40}")
    return adds


def find_tokenizer(*folders: Path) -> Path | None:
    """tokenizer.json (what transformers reads when a folder has both), else tokenizer.model,
    in the first folder that has one."""
    for folder in folders:
        for name in ("tokenizer.json", "tokenizer.model"):
            if (folder / name).is_file():
                return folder / name
    return None


# StreamDecoder's window, in tokens: CONTEXT of the prompt's last tokens decode with the first
# new ones; after PENDING tokens without a complete character a cut is tried; past WINDOW
# tokens it is forced (only a stream of bytes that never form text gets there).
CONTEXT, PENDING, WINDOW = 4, 8, 64
# A UTF-8 character still incomplete at the end is at most 3 bytes: at most 3 U+FFFD (one per
# byte for SentencePiece and byte-fallback decoders) that a later token can still change.
UNSETTLED = 3


def _unsettled(text: str) -> int:
    """How many U+FFFD at the end of `text` may still become a character."""
    run = len(text) - len(text.rstrip("\ufffd"))
    return min(run, UNSETTLED)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, decoding a bounded window per token
    (prefix/read offsets, as vLLM and TGI do) instead of the whole output.

    The window is ids[start:]: ids[start:read] are context (their text already out), decoded
    with the new ones so that a piece's leading space and a character split over byte tokens
    come out as in a decode of everything. Text is emitted once settled: all of it but a
    trailing incomplete UTF-8 sequence (U+FFFD now, a character later). `text` is everything
    emitted (the generated text, not the prefix's), `flush()` gives what is still held back.
    Deltas concatenate to decode(prefix + output) minus decode(prefix) for decoders that work
    token by token (SentencePiece, byte-level BPE); a byte-fallback tokenizer.json, which turns
    a whole run of invalid bytes into U+FFFD, may differ in those U+FFFD."""

    def __init__(self, tokenizer, prefix_ids=()):
        self.tokenizer = tokenizer
        self.ids: list[int] = [int(i) for i in prefix_ids]
        self._parts: list[str] = []
        self._start = self._read = len(self.ids)
        self._done = 0  # characters of decode(ids[start:]) already out (or the prefix's)
        if self.ids:
            # Context from the prompt's tail; longer when its last tokens decode to nothing
            # (control tokens), which would let SentencePiece drop a new piece's leading space.
            for size in (CONTEXT, WINDOW):
                self._start = max(len(self.ids) - size, 0)
                context = self._decode(self._start)
                if context:
                    break
            self._done = len(context) - _unsettled(context)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end])

    @property
    def text(self) -> str:
        """All text emitted so far (deltas joined; joined once per read)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def push(self, token: int) -> str:
        """The new token's text: "" while it ends inside a character."""
        self.ids.append(int(token))
        window = self._decode(self._start)
        settled = len(window) - _unsettled(window)
        delta = window[self._done:settled]
        self._done = max(self._done, settled)
        if settled == len(window):
            self._slide()
        elif len(self.ids) - self._read > PENDING:
            self._cut(window)
        if delta:
            self._parts.append(delta)
        return delta

    def flush(self) -> str:
        """What is held back (an incomplete character's U+FFFD at the end), as decode(all)
        has it; call once the output is complete."""
        window = self._decode(self._start)
        delta = window[self._done:]
        self._done = len(window)
        if delta:
            self._parts.append(delta)
        return delta

    def _slide(self) -> None:
        """Everything is out: the tokens since `read` become the context of the next window
        (unless they decode to nothing: then the context stays as it is, up to WINDOW)."""
        context = self._decode(self._read)
        if context or len(self.ids) - self._start > WINDOW:
            self._start, self._done = self._read, len(context)
        self._read = len(self.ids)

    def _cut(self, window: str) -> None:
        """Many tokens and still no complete character (invalid bytes): start the window at
        the 4th-last token where the text splits there (each token is at least a byte, so an
        incomplete character lies in the last 3); past WINDOW tokens start it there anyway."""
        cut = len(self.ids) - (UNSETTLED + 1)
        head, tail = self._decode(self._start, cut), self._decode(cut)
        if (head + tail == window and tail and len(head) <= self._done) \
                or len(self.ids) - self._start > WINDOW:
            self._done = min(max(self._done - len(head), 0), len(tail))
            self._start = self._read = cut
