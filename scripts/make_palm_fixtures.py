#!/usr/bin/env python3
"""Generate the PaLM test fixture from the public `palm-pytorch` implementation.

  pip install torch palm-pytorch==0.2.2 einops   # fixture generation only, not runtime deps
  python scripts/make_palm_fixtures.py            # writes tests/fixtures/palm/

A tiny random `palm_pytorch.PaLM` (parallel attention + SwiGLU FFN from one bias-free LayerNorm,
multi-query attention, rotate-half RoPE, tied embeddings) is converted into the runtime's native
checkpoint format (params.safetensors keyed by our parameter paths + config.yaml), and
palm-pytorch's own outputs are stored in expected.npz: logits of a 96-token prompt, and greedy
continuations of three prompts by full recomputation (palm-pytorch has no cache). The tests then
need no torch.

Facts of palm-pytorch 0.2.2 used by the conversion (read from its source):
- `fused_attn_ff_proj` [N*H + H + H + 2F, D] holds, in order, the query rows, the one key head,
  the one value head, and the FFN input; SwiGLU splits the FFN input as (x, gate) and computes
  silu(gate) * x, so the second half is our `linear` (activated) and the first our `linear_v`.
- queries are scaled by H^-0.5 before the dot product; LayerNorm uses F.layer_norm's eps 1e-5
  with a zero bias buffer; RoPE base 10000 over the whole head, halves concatenated.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "tests" / "fixtures" / "palm"
DIM, DEPTH, HEADS, DIM_HEAD, FF_MULT, VOCAB = 64, 3, 4, 16, 4, 256
PROMPT_LENGTH, NEW_TOKENS = 96, 40
GREEDY_PROMPTS = ([5, 6, 7], list(range(30, 47)), [200, 17, 4, 88, 31, 9, 250, 3, 0, 77, 13])


def runtime_config():
    from runtime.config import load_config
    return load_config("tiny-test").replace(
        vocab_size=VOCAB, sequence_len=256, emb_size=DIM, key_size=DIM_HEAD,
        num_q_heads=HEADS, num_kv_heads=1, num_layers=DEPTH, widening_factor=float(FF_MULT),
        intermediate_size=DIM * FF_MULT, num_experts=0, num_selected_experts=0,
        attn_output_multiplier=DIM_HEAD ** -0.5, embedding_multiplier_scale=1.0,
        output_multiplier_scale=1.0, attn_logit_cap=None, activation="silu",
        sandwich_norms=False, tie_embeddings=True, norm_type="layer", parallel_block=True,
        rope_base=10000.0, norm_eps=1e-5, eos_token=None, bos_token=None, dtype="float32")


def build_palm(seed: int):
    import torch
    from palm_pytorch import PaLM

    torch.manual_seed(seed)
    model = PaLM(dim=DIM, num_tokens=VOCAB, depth=DEPTH, dim_head=DIM_HEAD, heads=HEADS,
                 ff_mult=FF_MULT).eval()
    # Larger than the default init so attention is far from uniform and greedy margins are wide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape))
            elif name == "0.weight":  # embeddings (and, tied, the output head)
                p.copy_(0.5 * torch.randn(p.shape))
            else:
                p.copy_(0.12 * torch.randn(p.shape))
    return model


def convert(model) -> dict:
    """palm-pytorch state -> the runtime's parameter tree (float32 numpy)."""
    layer = "language_model/transformer/layers/decoder_layer/"
    inner, ffn = HEADS * DIM_HEAD, DIM * FF_MULT
    blocks = [model[1 + i].fn for i in range(DEPTH)]

    def stack(fn):
        return np.stack([fn(b) for b in blocks]).astype(np.float32)

    def fused(b):
        return b.fused_attn_ff_proj.weight.detach().numpy()  # [N*H + 2H + 2F, D]

    bounds = np.cumsum([0, inner, DIM_HEAD, DIM_HEAD, ffn, ffn])
    part = [lambda b, i=i: fused(b)[bounds[i]:bounds[i + 1]].T for i in range(5)]  # [D, out]
    return {
        "language_model/in_out_embed": {"embeddings": model[0].weight.detach().numpy()},
        "language_model/layer_norm": {"scale": model[-2].gamma.detach().numpy()},
        layer + "layer_norm": {"scale": stack(lambda b: b.norm.gamma.detach().numpy())},
        layer + "multi_head_attention/query": {"w": stack(part[0])},
        layer + "multi_head_attention/key": {"w": stack(part[1])},
        layer + "multi_head_attention/value": {"w": stack(part[2])},
        layer + "multi_head_attention/linear": {
            "w": stack(lambda b: b.attn_out.weight.detach().numpy().T)},
        layer + "mlp/linear_v": {"w": stack(part[3])},  # SwiGLU's x half
        layer + "mlp/linear": {"w": stack(part[4])},  # SwiGLU's gate half (silu applied)
        layer + "mlp/linear_1": {"w": stack(lambda b: b.ff_out[1].weight.detach().numpy().T)},
    }


def expected(model) -> dict:
    import torch

    rng = np.random.default_rng(7)
    arrays = {}
    with torch.no_grad():
        prompt = rng.integers(0, VOCAB, PROMPT_LENGTH)
        arrays["prompt"] = prompt.astype(np.int32)
        arrays["logits"] = model(torch.as_tensor(prompt)[None])[0].numpy().astype(np.float32)
        for i, start in enumerate(GREEDY_PROMPTS):
            seq, margins = list(start), []
            for _ in range(NEW_TOKENS):
                last = model(torch.as_tensor(seq)[None])[0, -1]
                top2 = torch.topk(last, 2).values
                margins.append(float(top2[0] - top2[1]))
                seq.append(int(torch.argmax(last)))
            arrays[f"prompt_{i}"] = np.array(start, np.int32)
            arrays[f"greedy_{i}"] = np.array(seq[len(start):], np.int32)
            arrays[f"margin_{i}"] = np.float32(min(margins))
    return arrays


def main():
    import dataclasses

    import yaml

    from runtime.checkpoint.native import write_native

    model = build_palm(seed=0)
    config = runtime_config()
    OUT.mkdir(parents=True, exist_ok=True)
    write_native(convert(model), OUT, config)
    # Only the fields that differ from the defaults: the file stays readable and valid when
    # unrelated fields are added later.
    fields = {f.name: f.default for f in dataclasses.fields(config)}
    values = {k: v for k, v in config.to_dict().items()
              if fields[k] is dataclasses.MISSING or v != fields[k]}
    (OUT / "config.yaml").write_text("# palm-pytorch 0.2.2 PaLM(dim=64, depth=3, heads=4, "
                                     "dim_head=16, ff_mult=4), converted\n"
                                     + yaml.safe_dump(values, sort_keys=False))
    arrays = expected(model)
    np.savez_compressed(OUT / "expected.npz", **arrays)
    margins = [float(arrays[f"margin_{i}"]) for i in range(len(GREEDY_PROMPTS))]
    print(f"wrote {OUT}: logits {arrays['logits'].shape}, std {arrays['logits'].std():.3f}, "
          f"smallest greedy margins {margins}")


if __name__ == "__main__":
    main()
