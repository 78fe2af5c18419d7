"""run.py's printed results for prompts given on the command line: text cut at stop strings,
each choice, or one JSON object per prompt (--json)."""

from __future__ import annotations

import json

from runtime.cli import DEFAULT_PROMPT


def stop_strings(tokenizer, stop: tuple, count: int):
    """An on_token that ends each of `count` samples at its stop strings (None: none)."""
    from runtime.stop_strings import StopStrings
    stops = StopStrings(tokenizer)
    for key in range(count):
        stops.add(key, stop)
    return stops.reached if stop else None


def _texts(tokenizer, choices, stop: tuple) -> list:
    """Each choice's text, cut where a stop string begins (None without a tokenizer)."""
    from runtime.stop_strings import cut_at_stop
    if tokenizer is None:
        return [None] * len(choices)
    texts = [tokenizer.decode(done.output_ids) for done in choices]
    return [text[:cut_at_stop(text, stop)] if stop and done.finish_reason == "stop" else text
            for text, done in zip(texts, choices)]


def print_completions(args, tokenizer, grouped, stream, sampling) -> None:
    from runtime.openai_batch import choice_records, logprob_records
    request = sampling.request
    logprobs = request.logprobs or request.top_logprobs
    for i, (kind_value, choices) in enumerate(zip(args.prompts or [("text", DEFAULT_PROMPT)],
                                                  grouped)):
        texts, done = _texts(tokenizer, choices, sampling.stop), choices[0]
        if args.json:
            kind, value = kind_value
            chat = {"messages": [{"role": "user", "content": value}]} if kind == "chat" else {}
            record = {"index": i, "prompt": value if kind == "text" else None, **chat,
                      "prompt_ids": done.prompt_ids, "output_ids": done.output_ids,
                      "text": texts[0], "finish_reason": done.finish_reason}
            if logprobs:
                record["logprobs"] = logprob_records(done.output_ids, done.logprobs)
            if len(choices) > 1:
                record["choices"] = choice_records(texts, choices, logprobs)
            print(json.dumps(record), flush=True)
        elif stream:
            print(f"\n[finish_reason: {done.finish_reason}]")
        else:
            prompt_text = tokenizer.decode(done.prompt_ids) if tokenizer else done.prompt_ids
            print(f"--- prompt {i}: {prompt_text!r}")
            for c, (text, done) in enumerate(zip(texts, choices)):
                if len(choices) > 1:
                    print(f"[choice {c}]")
                print(text if tokenizer else " ".join(map(str, done.output_ids)))
                print(f"[finish_reason: {done.finish_reason}, {len(done.output_ids)} tokens]")
