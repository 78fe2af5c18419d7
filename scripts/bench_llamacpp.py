#!/usr/bin/env python3
"""llama.cpp's side of `scripts/bench.py --peer llamacpp`: random Llama-family weights (Mixtral's
experts too) written as a GGUF (F32, Q8_0 or Q4_0) that both llama.cpp and the runtime load, and one llama.cpp timing
job per fresh process.

  python scripts/bench_llamacpp.py '{"job": "decode", "path": "m.gguf", "prompt_len": 64, ...}'

The timing job imports `llama_cpp` (llama-cpp-python, built from its source package; bench.py
puts its install folder on this process's PYTHONPATH only, so the project's environment never
sees it) and prints `BENCH_RESULT {json}` as its last stdout line, as bench_runtime.py does.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# The matrices' types; norms (1-D) stay F32 in every file, as llama.cpp's converter keeps them.
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
# A SentencePiece-like vocabulary's fixed head: llama.cpp's llama vocabulary looks up these
# and the byte pieces (the newline's at load), so the file carries them as real ones do.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def gguf_shapes(hf: dict) -> dict:
    """GGUF tensor name -> numpy shape ([out, in]; norms [width]) of a Llama-family HF config
    with tied embeddings (no output.weight: llama.cpp then reads token_embd for the logits)."""
    d, heads, kv = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
    hd = hf.get("head_dim") or d // heads
    ff, vocab = hf["intermediate_size"], hf["vocab_size"]
    shapes = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,)}
    if not hf.get("tie_word_embeddings", False):
        shapes["output.weight"] = (vocab, d)
    experts = hf.get("num_local_experts", 0)
    if experts:  # Mixtral: the experts stacked [E, out, in], the router [E, D]
        ffn = (("ffn_gate_inp", (experts, d)), ("ffn_gate_exps", (experts, ff, d)),
               ("ffn_up_exps", (experts, ff, d)), ("ffn_down_exps", (experts, d, ff)))
    else:
        ffn = (("ffn_gate", (ff, d)), ("ffn_up", (ff, d)), ("ffn_down", (d, ff)))
    for i in range(hf["num_hidden_layers"]):
        shapes.update({f"blk.{i}.{name}.weight": shape for name, shape in (
            ("attn_norm", (d,)), ("ffn_norm", (d,)), ("attn_q", (heads * hd, d)),
            ("attn_k", (kv * hd, d)), ("attn_v", (kv * hd, d)), ("attn_output", (d, heads * hd)),
            *ffn)})
    return shapes


def vocabulary(size: int) -> tuple[list[str], list[int]]:
    """(tokens, GGUF token types) of `size` entries: <unk>, <s>, </s>, the 256 byte pieces, then
    placeholders; decode speed is timed on token ids, so no real text is needed."""
    import gguf
    head = list(SPECIAL_TOKENS) + [f"<0x{b:02X}>" for b in range(256)]
    tokens = head + [f"<t{i}>" for i in range(len(head), size)]
    types = ([gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 2
             + [gguf.TokenType.BYTE] * 256
             + [gguf.TokenType.NORMAL] * (size - len(head)))
    return tokens[:size], [int(t) for t in types[:size]]


def write_metadata(writer, hf: dict) -> None:
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(d)
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(hf["num_key_value_heads"])
    writer.add_rope_dimension_count(d // heads)
    writer.add_rope_freq_base(hf.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    if hf.get("num_local_experts"):
        writer.add_expert_count(hf["num_local_experts"])
        writer.add_expert_used_count(hf["num_experts_per_tok"])
    tokens, types = vocabulary(hf["vocab_size"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def random_tensor(name: str, shape: tuple, hf: dict, rng) -> np.ndarray:
    """bench_runtime's draw: norms 1, matrices normal with std 1/sqrt(fan-in), the table
    1/sqrt(D). Random rows need no q/k RoPE permutation: both readers see the same file."""
    if len(shape) == 1:
        return np.ones(shape, np.float32)
    fan_in = hf["hidden_size"] if name == "token_embd.weight" else shape[-1]
    return (rng.standard_normal(shape, np.float32) / math.sqrt(fan_in)).astype(np.float32)


def write_random_gguf(path: Path, hf: dict, qtype: str = "F32", seed: int = 0) -> dict:
    """A llama GGUF of random weights of the HF config `hf` at `path`: matrices in `qtype`
    (gguf.quants.quantize), norms F32. Returns {name: GGUF type name} as written."""
    import gguf
    if qtype not in GGUF_TYPES:
        raise ValueError(f"GGUF type {qtype}: not one of {', '.join(GGUF_TYPES)}")
    kind = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    write_metadata(writer, hf)
    written = {}
    for name, shape in gguf_shapes(hf).items():
        value = random_tensor(name, shape, hf, rng)
        if value.ndim == 1 or qtype == "F32" or name.endswith("ffn_gate_inp.weight"):
            writer.add_tensor(name, value)
            written[name] = "F32"
        else:
            data = gguf.quants.quantize(value, kind)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
            written[name] = qtype
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def decode_job(job: dict) -> dict:
    """llama.cpp on job["path"]: a prompt of job["prompt_len"] random ids evaluated in one
    batch (timed), then job["decode_steps"] greedy steps at batch 1, each one token through
    Llama.eval (llama_decode) after an argmax over the last logits row, timed apiece;
    an untimed first step warms up, as the runtime's compiling first step is untimed."""
    import llama_cpp
    prompt_len, steps = job["prompt_len"], job["decode_steps"]
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=job["path"], n_threads=job["threads"],
                          n_threads_batch=job["threads"], n_ctx=prompt_len + steps + 8,
                          n_batch=prompt_len, n_ubatch=prompt_len, verbose=False)
    load_s = time.perf_counter() - start
    vocab = llm.n_vocab()
    prompt = np.random.default_rng(job.get("seed", 0)).integers(3, vocab, prompt_len)
    prefill_times = []
    for _ in range(job.get("repeats", 3)):  # the same prompt from an empty cache: same work
        llm.reset()  # eval drops the cache past n_tokens (0) before decoding
        start = time.perf_counter()
        llm.eval([int(t) for t in prompt])
        prefill_times.append(time.perf_counter() - start)
    # Llama.eval keeps no logits unless every row's are asked for: read the last row's
    # straight from the context (a view, no copy) for the greedy choice
    def greedy() -> int:
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(vocab,))))

    llm.eval([greedy()])  # warm-up step
    step_times = []
    for _ in range(steps):
        start = time.perf_counter()
        llm.eval([greedy()])
        step_times.append(time.perf_counter() - start)
    step = statistics.median(step_times)
    return {"rows": [{"batch": 1, "prompt_len": prompt_len, "decode_steps": steps,
                      "prefill_s": min(prefill_times),
                      "prefill_tokens_per_s": prompt_len / min(prefill_times),
                      "decode_step_s": step, "decode_step_min_s": min(step_times),
                      "decode_tokens_per_s": 1.0 / step}],
            "load_s": load_s, "llama_cpp": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace")}


def main() -> int:
    job = json.loads(sys.argv[1])
    if job["job"] != "decode":
        raise SystemExit(f"bench_llamacpp.py: unknown job {job['job']!r}")
    print("BENCH_RESULT " + json.dumps(decode_job(job)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
