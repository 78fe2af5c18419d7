"""One HTTP request's samples as they come from the worker: text deltas (held back where a stop
string may be starting), the final responses, and server-sent events, in OpenAI's shapes."""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Optional

from runtime import openai_api as api
from runtime.request import Completion
from runtime.stop_strings import cut_at_stop
from runtime.tokenizer import StreamDecoder

DISCONNECT_POLL = 1.0  # s: how often a non-streaming request checks that its client is there


class ChoiceText:
    """A choice's text from its tokens, O(1) per token (StreamDecoder): push() returns what
    may be sent now, keeping back the last characters that could begin a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.stop = stop
        self.hold = max(map(len, stop)) - 1 if stop else 0
        self.text, self.sent = "", 0
        self.ids: list[int] = []

    def push(self, token: int) -> str:
        self.ids.append(token)
        if self.decoder is None:
            return ""
        self.text += self.decoder.push(token)
        return self._release(len(self.text) - self.hold)

    def finish(self) -> str:
        """The rest of the text (a stop string and what follows it cut off)."""
        if self.decoder is not None:
            self.text += self.decoder.flush()
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        cut = cut_at_stop(self.text, self.stop) if self.stop else None
        if cut is not None:
            end = min(end, cut)
            self.text = self.text[:cut]
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta


class Exchange:
    """The events of one request's n jobs (a worker sink per job) and how they are answered."""

    def __init__(self, chat: bool, request_id: str, model: str, created: int, tokenizer,
                 parsed: api.ParsedBody, echo_text: str = "",
                 echo_logprobs: Optional[list] = None):
        """echo_text: the prompt's text, before each choice's (completions with echo);
        echo_logprobs: its tokens' (logprob, top) entries (echo with logprobs)."""
        self.chat, self.id, self.model, self.created = chat, request_id, model, created
        self.tokenizer, self.parsed, self.echo_text = tokenizer, parsed, echo_text
        self.echo_logprobs = echo_logprobs
        n = parsed.sampling.n
        self.events: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.texts = [ChoiceText(tokenizer, parsed.sampling.stop) for _ in range(n)]
        self.completions: list[Optional[Completion]] = [None] * n
        self.open = n

    def sink(self, choice: int):
        """A worker-thread callback delivering job `choice`'s events to this request's loop."""
        def deliver(event: tuple) -> None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (choice, event))
        return deliver

    def _logprobs(self, ids, entries, offset: int = 0) -> Optional[dict]:
        if not self.parsed.request.logprobs and not self.parsed.request.top_logprobs:
            return None
        if self.chat:
            return api.chat_logprobs(self.tokenizer, ids, entries)
        return api.completion_logprobs(self.tokenizer, ids, entries, offset)

    def _usage(self) -> dict:
        return api.usage(len(self.parsed.request.prompt_ids),
                         sum(len(c.output_ids) for c in self.completions if c is not None))

    async def next_event(self, request=None) -> tuple:
        """The next (choice, event); raises ConnectionError when `request`'s client left."""
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), DISCONNECT_POLL)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    raise ConnectionError("client disconnected") from None

    async def collect(self, request) -> dict:
        """The whole response, once every choice is done."""
        while self.open:
            choice, event = await self.next_event(request)
            if event[0] == "error":
                raise RuntimeError(event[1])
            if event[0] == "token":
                self.texts[choice].push(event[1])
            else:
                self.completions[choice] = event[1]
                self.open -= 1
        choices = []
        prompt = list(self.parsed.request.prompt_ids) if self.echo_logprobs else []
        for index, (text, done) in enumerate(zip(self.texts, self.completions)):
            text.finish()
            logprobs = self._logprobs(prompt + done.output_ids,
                                      (self.echo_logprobs or []) + (done.logprobs or []),
                                      0 if prompt else len(self.echo_text))
            choices.append(api.choice(self.chat, index, self.echo_text + text.text,
                                      api.finish_reason(done), logprobs))
        return api.response(self.chat, self.id, self.model, self.created, choices,
                            self._usage())

    async def events_as_sse(self) -> AsyncIterator[str]:
        """Server-sent events: a chunk per text delta, one per finished choice, the usage
        chunk when asked, then [DONE]."""
        if self.chat or self.echo_text:
            logprobs = self._logprobs(list(self.parsed.request.prompt_ids),
                                      self.echo_logprobs) if self.echo_logprobs else None
            for index in range(len(self.texts)):  # the role (chat), or the echoed prompt
                yield self._chunk(index, self.echo_text, None, logprobs, first=True)
        while self.open:
            choice, event = await self.next_event()
            if event[0] == "error":
                yield _sse(api.error_body(event[1], "server_error"))
                return
            if event[0] == "token":
                _, token, entry, _ = event
                offset = len(self.echo_text) + len(self.texts[choice].text)
                delta = self.texts[choice].push(token)
                logprobs = self._logprobs([token], [entry], offset) if entry is not None \
                    else None
                if delta or logprobs:
                    yield self._chunk(choice, delta, None, logprobs)
                continue
            self.completions[choice] = done = event[1]
            self.open -= 1
            yield self._chunk(choice, self.texts[choice].finish(), api.finish_reason(done))
        if self.parsed.include_usage:
            yield _sse(api.response(self.chat, self.id, self.model, self.created, [],
                                    self._usage(), chunk=True))
        yield "data: [DONE]\n\n"

    def _chunk(self, index: int, text: str, reason: Optional[str], logprobs=None,
               first: bool = False) -> str:
        body = api.choice(self.chat, index, text, reason, logprobs, delta=True, first=first)
        return _sse(api.response(self.chat, self.id, self.model, self.created, [body],
                                 None, chunk=True))


def _sse(value: dict) -> str:
    return f"data: {json.dumps(value, ensure_ascii=False)}\n\n"
