#!/usr/bin/env python3
"""The Hugging Face transformers peer of scripts/bench.py (torch, CPU), in its own process.

  python scripts/bench_hf.py '{"family": "llama", "hf_config": {...}, "dir": DIR, ...}'

Builds a random LlamaForCausalLM / MixtralForCausalLM from the config (seeded), saves it to DIR
with save_pretrained (the runtime then loads that very folder), and times the same work the
runtime's engine job does: prefill of `batch` prompts of `prompt_len` tokens (one forward with
the KV cache, logits of the last position only: logits_to_keep=1, as generate() does), then
greedy decode steps feeding each argmax back with the cache (a bare loop: no generate()
overhead). float32 on the CPU (bfloat16 on "cuda"), torch threads = cores; each of HF's
attention implementations (sdpa, eager) is timed and the faster kept per phase. Prints `BENCH_RESULT {json}` as its last stdout line.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path


def time_one(model, ids, steps: int, repeats: int, attention: str) -> dict:
    """Best prefill of `ids` [B, P] over `repeats` (after a warm-up call) and the median of
    `steps` greedy decode steps (after one warm-up step) with HF's own KV cache."""
    import torch
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)  # GPU kernels are async
    with torch.inference_mode():
        prefill_times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            sync()
            prefill_times.append(time.perf_counter() - start)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        step_times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            step_times.append(time.perf_counter() - start)
    return {"attention": attention, "prefill_s": min(prefill_times[1:]),
            "decode_step_s": statistics.median(step_times[1:])}


def matmul_rate(device: str, dtype, size: int = 2048, repeats: int = 5) -> float:
    """torch's best square-matmul rate (FLOP/s): with XLA's own (the runtime's peaks job), the
    machine's matmul limit that both sides' prefill is judged against."""
    import torch
    a = torch.ones((size, size), dtype=dtype, device=device)
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        torch.mm(a, a)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def main() -> None:
    job = json.loads(sys.argv[1])
    import torch
    import transformers

    torch.set_num_threads(job.get("threads") or os.cpu_count())
    torch.manual_seed(job.get("seed", 0))
    family = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
              "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM)}
    config_cls, model_cls = family[job["family"]]
    config = config_cls(**job["hf_config"])
    model = model_cls(config).to(torch.float32).eval()
    folder = Path(job["dir"])
    if not (folder / "config.json").is_file():
        model.save_pretrained(folder)  # safetensors; the runtime reads exactly these weights
    device = job.get("device", "cpu")  # "cuda" on a GPU machine (with dtype bfloat16)
    model = model.to(device, getattr(torch, job.get("dtype", "float32")))

    rows = []
    generator = torch.Generator().manual_seed(job.get("seed", 0))
    for batch in job["batches"]:
        ids = torch.randint(3, config.vocab_size, (batch, job["prompt_len"]),
                            generator=generator).to(device)
        # HF's attention kernels differ a lot on the CPU (SDPA, its default, is slow for batched
        # GQA decode here): time each and keep the faster per phase, the peer at its best.
        runs = []
        for attention in job.get("attn_implementations", ["sdpa", "eager"]):
            model.set_attn_implementation(attention)
            runs.append(time_one(model, ids, job["decode_steps"], job.get("repeats", 2),
                                 attention))
        prefill = min(runs, key=lambda r: r["prefill_s"])
        decode = min(runs, key=lambda r: r["decode_step_s"])
        row = {"batch": batch, "prompt_len": job["prompt_len"], "prefill_s": prefill["prefill_s"],
               "prefill_tokens_per_s": ids.numel() / prefill["prefill_s"],
               "prefill_attention": prefill["attention"], "decode_step_s": decode["decode_step_s"],
               "decode_tokens_per_s_per_seq": 1 / decode["decode_step_s"],
               "decode_tokens_per_s": batch / decode["decode_step_s"],
               "decode_attention": decode["attention"], "runs": runs}
        rows.append(row)
        print(f"[bench] HF {job['family']} B={batch} P={job['prompt_len']}: prefill "
              f"{row['prefill_tokens_per_s']:.0f} tok/s ({prefill['attention']}), decode "
              f"{row['decode_tokens_per_s']:.1f} tok/s ({decode['decode_step_s'] * 1e3:.1f} "
              f"ms/step, {decode['attention']})", file=sys.stderr, flush=True)
    result = {"rows": rows, "torch": torch.__version__, "transformers": transformers.__version__,
              "threads": torch.get_num_threads(),
              "matmul_flops_per_s": matmul_rate(device, getattr(torch, job.get("dtype",
                                                                               "float32"))),
              "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
