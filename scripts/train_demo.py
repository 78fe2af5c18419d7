#!/usr/bin/env python3
"""Train the demo checkpoint in checkpoints/demo: a small Grok-1-architecture model on the prose
of the Python standard library (its documentation topics and its docstrings; PSF-2.0).

  python scripts/train_demo.py                   # the shipped run: corpus, tokenizer, training,
                                                 # int8 export, held-out perplexities, README
  python scripts/train_demo.py --out /tmp/demo --steps 40     # a quick trial

Everything is a function of the interpreter's standard library and --seed: the corpus is read
from files in sorted order, the tokenizer is trained single-threaded on unshuffled input, the
parameters start from a fixed PRNG key and the batches are drawn by numpy's default_rng(seed).

Training runs the runtime's own forward (runtime.models.build_model), so training and serving
share the math. The one addition: the MoE's gates pass through an identity whose backward pass
adds the gradient of a load-balancing loss (`load_balancing`), since the router's probabilities
are not an output of the model. Evaluation and export use the runtime unchanged.

Two runs with the same arguments on the same machine write byte-identical checkpoints.

Needs optax (training only; the runtime does not): pip install optax.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import hashlib
import io
import json
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from eval_perplexity import DOC_SEPARATOR, encode_documents, perplexity  # noqa: E402

CONFIG = ROOT / "configs" / "demo.yaml"
OUT = ROOT / "checkpoints" / "demo"
LAYER = "language_model/transformer/layers/decoder_layer/"
# int8 export: scale row blocks per matmul weight (8 for the row-parallel ones, as in Grok-1).
# The router, the norms and the (tied) embeddings stay float32.
QUANTIZED = {"multi_head_attention/query": 1, "multi_head_attention/key": 1,
             "multi_head_attention/value": 1, "multi_head_attention/linear": 8,
             "moe/linear": 1, "moe/linear_v": 1, "moe/linear_1": 8}

# ---------------------------------------------------------------------------------------------
# Corpus

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
             "turtledemo", "ensurepip", "__pycache__", "encodings", "pydoc_data"}
MIN_DOCSTRING_CHARS = 150
HELDOUT_MODULUS = 50  # a document is held out when sha256(text) % 50 == 0: about 2%
HELDOUT_MAX_BYTES = 100_000


def _tidy(text: str) -> str:
    lines = [line.rstrip() for line in text.expandtabs(8).splitlines()]
    return "\n".join(lines).strip("\n")


def _is_english_prose(text: str) -> bool:
    """Mostly ASCII, mostly letters: drops non-English text, tables and code-only docstrings."""
    if len(text) < MIN_DOCSTRING_CHARS:
        return False
    if sum(ch.isascii() for ch in text) < 0.99 * len(text):
        return False
    visible = [ch for ch in text if not ch.isspace()]
    letters = sum(ch.isalpha() for ch in visible)
    words = text.split()
    return letters >= 0.7 * len(visible) and len(words) >= 20


def topics_documents(stdlib: Path) -> list[str]:
    """The Python documentation's prose topics (pydoc_data/topics.py), read without importing."""
    tree = ast.parse((stdlib / "pydoc_data" / "topics.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "topics"
                                                for t in node.targets):
            topics = ast.literal_eval(node.value)
            return [_tidy(topics[key]) for key in sorted(topics)]
    raise SystemExit(f"no `topics = {{...}}` in {stdlib / 'pydoc_data' / 'topics.py'}")


def docstring_documents(stdlib: Path) -> list[str]:
    """Docstrings of the standard library's modules, classes and functions, parsed with ast."""
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        if set(path.relative_to(stdlib).parts[:-1]) & SKIP_DIRS:
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # a few deliberately broken files live in the stdlib
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and _is_english_prose(_tidy(doc)):
                    docs.append(_tidy(doc))
    return docs


def build_corpus() -> tuple[list[str], list[str], dict]:
    """(training documents, held-out documents, description), deterministic."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    topics = topics_documents(stdlib)
    docstrings = docstring_documents(stdlib)
    docs, seen = [], set()
    for doc in topics + docstrings:
        if doc and doc not in seen:
            seen.add(doc)
            docs.append(doc)
    held = lambda d: int(hashlib.sha256(d.encode("utf-8")).hexdigest(), 16) % HELDOUT_MODULUS == 0
    train = [d for d in docs if not held(d)]
    heldout = [d for d in docs if held(d)]
    info = {"stdlib": str(stdlib), "python": sys.version.split()[0],
            "topics": len(topics), "docstrings": len(docstrings), "documents": len(docs),
            "train_documents": len(train), "heldout_documents": len(heldout),
            "train_chars": sum(map(len, train)), "heldout_chars": sum(map(len, heldout))}
    return train, heldout, info


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(docs: list[str], vocab_size: int) -> bytes:
    """A SentencePiece BPE model trained on the lines of `docs`: the serialized proto."""
    import sentencepiece

    lines = [line for doc in docs for line in doc.split("\n") if line.strip()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, character_coverage=0.9999, byte_fallback=True,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3,  # the Grok-1 convention
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=True, user_defined_symbols=["\n"],
        num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
        max_sentence_length=16384, minloglevel=2)
    return model.getvalue()


# ---------------------------------------------------------------------------------------------
# MoE load balancing (training only)


@functools.lru_cache(maxsize=None)
def _balancing(weight: float, num_experts: int):
    """Identity on the router gates whose backward pass adds the gradient of a load-balancing
    loss: weight * E * sum_e f_e * P_e, with f_e the share of the routed (token, expert) pairs
    that go to expert e (no gradient) and P_e the gates of those pairs summed over tokens,
    divided by the token count (a Switch-Transformer-style loss over the selected experts)."""
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def gates_through(gates, experts):
        return gates

    def forward(gates, experts):
        return gates, experts

    def backward(experts, dgates):
        counts = jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(1.0)
        share = counts / experts.size
        tokens = experts.size // experts.shape[-1]
        extra = weight * num_experts * share[experts] / tokens
        return dgates + extra.astype(dgates.dtype), np.zeros(experts.shape, jax.dtypes.float0)

    gates_through.defvjp(forward, backward)
    return gates_through


@contextlib.contextmanager
def load_balancing(weight: float, num_experts: int):
    """Trace the model's MoE with the load-balancing gradient on its gates (training only)."""
    import runtime.models.transformer as model_module
    original = model_module.MixtureOfExperts.__call__
    through = _balancing(weight, num_experts)

    def balanced(self, x, gates, experts):
        return original(self, x, through(gates, experts), experts)

    if weight > 0:
        model_module.MixtureOfExperts.__call__ = balanced
    try:
        yield
    finally:
        model_module.MixtureOfExperts.__call__ = original


# ---------------------------------------------------------------------------------------------
# Training


def decay_mask(params):
    """Weight decay on matmul weights and embeddings; not on norm scales."""
    import jax
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def train(config, stream: np.ndarray, args, log) -> tuple[dict, dict]:
    import jax
    import jax.numpy as jnp
    import optax

    from runtime.models import build_model

    model = build_model(config)
    params = model.init(jax.random.PRNGKey(args.seed))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    experts = sum(int(np.prod(params[LAYER + m]["w"].shape))
                  for m in ("moe/linear", "moe/linear_v", "moe/linear_1"))
    log(f"[train] {count:,} parameters ({experts:,} in the experts); {args.steps} steps of "
        f"{args.batch} x {config.sequence_len} tokens")

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup_steps=min(args.warmup, args.steps // 2), decay_steps=args.steps,
        end_value=args.lr * args.final_lr_fraction)
    optimizer = optax.chain(
        optax.clip_by_global_norm(args.clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=args.weight_decay,
                    mask=decay_mask))
    opt_state = optimizer.init(params)
    length, L, K, H = config.sequence_len, config.num_layers, config.num_kv_heads, config.key_size

    def loss_fn(params, window):  # window [B, T + 1]
        tokens, targets = window[:, :-1], window[:, 1:]
        batch = tokens.shape[0]
        kv = jnp.zeros((L, batch, length, K, H), jnp.float32)
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (batch, length))
        logits, _, _ = model.apply(params, tokens, kv, kv, positions)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

    @jax.jit
    def step(params, opt_state, window):
        loss, grads = jax.value_and_grad(loss_fn)(params, window)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

    rng = np.random.default_rng(args.seed)
    starts_max = len(stream) - (length + 1)
    history = []
    pending = []
    start = last = time.time()
    with load_balancing(args.balance, config.num_experts):
        for i in range(1, args.steps + 1):
            starts = rng.integers(0, starts_max + 1, args.batch)
            window = np.stack([stream[s:s + length + 1] for s in starts])
            params, opt_state, loss, gnorm = step(params, opt_state, window)
            pending.append((loss, gnorm))
            if i % args.log_every == 0 or i == args.steps:
                losses = [float(l) for l, _ in pending]
                now = time.time()
                tokens = len(pending) * args.batch * length
                mean = sum(losses) / len(losses)
                history.append({"step": i, "loss": round(mean, 4),
                                "seconds": round(now - start, 1)})
                log(f"[train] step {i:5d}  loss {mean:.4f}  grad-norm {float(pending[-1][1]):.3f}"
                    f"  lr {float(schedule(i)):.2e}  {tokens / (now - last):7.0f} tok/s  "
                    f"{now - start:7.1f} s")
                pending, last = [], now
    seconds = time.time() - start
    summary = {"parameters": count, "expert_parameters": experts, "steps": args.steps,
               "batch": args.batch, "tokens": args.steps * args.batch * length,
               "seconds": round(seconds, 1), "history": history}
    log(f"[train] done: {summary['tokens']:,} tokens in {seconds / 60:.1f} min")
    return jax.device_get(params), summary


def quantized(params) -> dict:
    from runtime.quant import quantize
    out = {module: dict(leaves) for module, leaves in params.items()}
    for sub, row_blocks in QUANTIZED.items():
        out[LAYER + sub]["w"] = quantize(out[LAYER + sub]["w"], row_blocks=row_blocks)
    return out


def expert_usage(config, params, ids: np.ndarray) -> list[list[float]]:
    """Fraction of routed (token, expert) pairs per expert in each layer, on `ids`."""
    import jax

    import runtime.models.transformer as model_module

    counts = []
    original = model_module.MixtureOfExperts.__call__

    def counting(self, x, gates, experts):
        jax.debug.callback(lambda e: counts.append(np.bincount(np.asarray(e).ravel(),
                                                               minlength=config.num_experts)),
                           experts, ordered=True)
        return original(self, x, gates, experts)

    model_module.MixtureOfExperts.__call__ = counting
    try:
        perplexity(model_module.build_transformer(config), params, ids[:8 * config.sequence_len])
        jax.effects_barrier()
    finally:
        model_module.MixtureOfExperts.__call__ = original
    per_layer = np.sum(np.reshape(counts, (-1, config.num_layers, config.num_experts)), axis=0)
    return (per_layer / per_layer.sum(axis=-1, keepdims=True)).round(3).tolist()


# ---------------------------------------------------------------------------------------------
# Output


def heldout_text(docs: list[str]) -> str:
    """Held-out documents (whole ones, in order) up to HELDOUT_MAX_BYTES."""
    kept, size = [], 0
    for doc in docs:
        cost = len((doc + DOC_SEPARATOR).encode("utf-8"))
        if size + cost > HELDOUT_MAX_BYTES:
            break
        kept.append(doc)
        size += cost
    return DOC_SEPARATOR.join(kept) + "\n"


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sample_run(out: Path) -> dict:
    """`python run.py --checkpoint OUT` in a fresh process (default prompt and settings): its
    wall-clock time from start to exit, imports, loading and compilation included, and output."""
    import subprocess
    begin = time.time()
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), "--checkpoint", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    seconds = time.time() - begin
    if done.returncode:
        raise SystemExit(f"run.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = done.stdout.rstrip("\n").split("\n")  # --- prompt 0: 'TEXT' / text / [finish...]
    prompt = ast.literal_eval(lines[0].split(": ", 1)[1])
    return {"cold_start_seconds": round(seconds, 1), "sample": prompt + "\n".join(lines[1:-1]),
            "sample_finish": lines[-1]}


def _usage_table(usage) -> str:
    experts = len(usage[0])
    rows = ["| layer | " + " | ".join(f"e{e}" for e in range(experts)) + " |",
            "| --- |" + " --- |" * experts]
    for layer, shares in enumerate(usage):
        rows.append(f"| {layer} | " + " | ".join(f"{100 * s:.1f}%" for s in shares) + " |")
    return "\n".join(rows)


def write_readme(out: Path, m: dict) -> None:
    c, t, cor, a = m["config"], m["training"], m["corpus"], m["args"]
    warmup = min(a["warmup"], t["steps"] // 2)
    sample = m.get("sample", "(not measured)")
    # The fastest logged interval: the rate when no other work shares the cores.
    h = t["history"]
    fastest = max((b["step"] - a["step"]) * t["batch"] * c["sequence_len"]
                  / max(b["seconds"] - a["seconds"], 1e-9) for a, b in zip(h, h[1:]))
    text = f"""# Demo checkpoint

A small model with the Grok-1 architecture, trained from scratch on English prose from the Python
standard library, so that `python run.py` has something real to sample on any machine, and the
tests and benchmarks have a model whose outputs mean something. Written by
`python scripts/train_demo.py` (seed {m['seed']}); every number below comes from that run.

| | |
| --- | --- |
| architecture | Grok-1: {c['num_layers']} layers, width {c['emb_size']}, {c['num_q_heads']} query heads over {c['num_kv_heads']} kv heads (GQA) of size {c['key_size']}, MoE with {c['num_experts']} experts (ffn width {m['ffn_size']}) and top-{c['num_selected_experts']} routing, sandwich RMS norms, attention logits soft-capped at {c['attn_logit_cap']:g}, RoPE, tied input/output embeddings |
| parameters | {t['parameters']:,} ({t['expert_parameters']:,} in the experts; about {m['active_parameters']:,} used per token) |
| context | {c['sequence_len']} tokens |
| tokenizer | SentencePiece BPE, {c['vocab_size']} pieces, byte fallback; pad 0, bos 1, eos 2, unk 3 (the Grok-1 convention); trained on the training split |
| weights | `ckpt-0/` in the released Grok-1 format: attention and expert matmuls int8 (`QuantizedWeight8bit`, bf16 scales: 8 row blocks for `multi_head_attention/linear` and `moe/linear_1`, 1 for the others); router, norms and embeddings float32 |
| size | {m['bytes'] / 1e6:.1f} MB on disk (this folder) |
| held-out perplexity, float32 weights | **{m['perplexity_float']:.2f}** over {m['heldout_tokens']:,} tokens |
| held-out perplexity, int8 weights as shipped | **{m['perplexity_int8']:.2f}** ({m['int8_change_percent']:+.2f}% vs float) |
| uniform-distribution perplexity | {c['vocab_size']} |
| training | {t['tokens']:,} tokens in {t['seconds'] / 60:.1f} minutes on {m['machine']} |
| `python run.py`, fresh process | {m.get('cold_start_seconds', float('nan')):.1f} s from start to exit (imports, loading, compilation and 64 new tokens) on {m['machine']} |

## Sample

`python run.py` (default prompt and settings: temperature 0.8, top-p 0.95, seed 0, 64 new
tokens), as it streams to a terminal:

```
{sample}
```

## Corpus

English prose from the standard library of Python {cor['python']} (the interpreter this repository
targets), license **PSF-2.0** (Python Software Foundation License Version 2):

- `pydoc_data/topics.py`: the Python documentation's topics as plain text ({cor['topics']} topics),
  read with `ast.literal_eval` of the assignment (never imported);
- docstrings of the modules, classes and functions of the stdlib's `.py` files, extracted with
  `ast` (never imported), dedented, skipping `test/`, `tests/`, `idlelib/`, `lib2to3/`,
  `turtledemo/`, `ensurepip/`, `encodings/` and `site-packages/`, and keeping only those of at
  least {MIN_DOCSTRING_CHARS} characters, 20 words, 99% ASCII and 70% letters ({cor['docstrings']:,} docstrings).

After exact de-duplication: {cor['documents']:,} documents. A document is held out when the
SHA-256 of its text is 0 modulo {HELDOUT_MODULUS} (about 2%): {cor['heldout_documents']} documents,
{cor['heldout_chars']:,} characters. The rest, {cor['train_documents']:,} documents and
{cor['train_chars']:,} characters ({m['train_tokens']:,} tokens with a BOS and an EOS per
document), trains the tokenizer and the model. `heldout.txt` holds the held-out documents,
separated by a form feed on a line of its own; the perplexities above are over all of it
(`scripts/eval_perplexity.py` has the protocol).

## Training

- Objective: next-token cross-entropy on windows of {c['sequence_len']} + 1 tokens drawn uniformly
  from the concatenated training documents (numpy `default_rng({m['seed']})`), batch {t['batch']};
  plus a load-balancing loss on the router (weight {a['balance']} per layer; Switch-Transformer
  style over the selected experts), so that all experts stay in use.
- Optimizer: optax AdamW (b1 0.9, b2 0.95, weight decay {a['weight_decay']} on matmul weights and
  embeddings), global-norm clipping at {a['clip']}, peak learning rate {a['lr']:g} after {warmup}
  linear warm-up steps, cosine decay to {a['lr'] * a['final_lr_fraction']:g} at step {t['steps']}.
- {t['steps']:,} steps, {t['tokens']:,} tokens (about {t['tokens'] / max(m['train_tokens'], 1):.1f} passes over the
  training split), {t['seconds'] / 60:.1f} minutes on {m['machine']}, shared with other work
  (the fastest logged interval ran at {fastest:,.0f} tokens/s: {t['tokens'] / fastest / 60:.0f} minutes at that rate);
  final training loss {t['history'][-1]['loss']:.3f}. The whole script, corpus to README, took
  {m['total_seconds'] / 60:.1f} minutes.
- The forward pass is the runtime's own (`runtime.models.build_model`, float32), differentiated
  by `jax.grad`: training and serving share the math.

Share of the routed (token, expert) pairs of each expert, per layer, on held-out text (float
weights; 12.5% each would be perfectly balanced):

{_usage_table(m['expert_usage'])}

Reproduce (replaces this folder's contents): `pip install optax && python scripts/train_demo.py
--force`. Evaluate: `python scripts/eval_perplexity.py checkpoints/demo`.

## Files

- `ckpt-0/tensor00000_000` ... : the weights, one pickle per parameter leaf ({m['files']} files)
- `tokenizer.model`: the SentencePiece model
- `config.yaml`: the model config (the `demo` preset in `configs/`)
- `heldout.txt`: the held-out documents
- `metrics.json`: the numbers above, machine-readable
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def finish(out: Path, metrics: dict, log) -> None:
    """Sample with run.py in a fresh process, then write metrics.json and README.md."""
    metrics.update(sample_run(out))
    log(f"[sample] python run.py: {metrics['cold_start_seconds']} s\n{metrics['sample']}")
    metrics["bytes"] = directory_bytes(out)  # README and metrics.json add a few KB
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    write_readme(out, metrics)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--final-lr-fraction", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--balance", type=float, default=0.02,
                   help="weight of the MoE load-balancing loss (per layer; 0 = off)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--force", action="store_true", help="replace an existing checkpoint in --out")
    p.add_argument("--readme-only", action="store_true",
                   help="only re-measure run.py and rewrite README.md from --out's metrics.json")
    args = p.parse_args(argv)

    def log(message):
        print(message, flush=True)

    if args.readme_only:
        finish(args.out, json.loads((args.out / "metrics.json").read_text()), log)
        return 0

    import jax

    from runtime.checkpoint.grok_ckpt import write_ckpt0
    from runtime.checkpoint.load import load_params
    from runtime.config import load_config
    from runtime.models import build_model
    from runtime.tokenizer import Tokenizer

    out = args.out
    if (out / "ckpt-0").exists():
        if not args.force:
            raise SystemExit(f"{out / 'ckpt-0'} exists: pass --force to replace it")
        shutil.rmtree(out / "ckpt-0")
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(args.config)
    begin = time.time()

    train_docs, heldout_docs, corpus = build_corpus()
    log(f"[corpus] {json.dumps(corpus)}")
    (out / "tokenizer.model").write_bytes(train_tokenizer(train_docs, config.vocab_size))
    tokenizer = Tokenizer(out / "tokenizer.model")
    assert tokenizer.vocab_size == config.vocab_size, tokenizer.vocab_size
    order = np.random.default_rng(args.seed).permutation(len(train_docs))
    stream = encode_documents(tokenizer, [train_docs[i] for i in order], config.bos_token,
                              config.eos_token)
    held_text = heldout_text(heldout_docs)
    (out / "heldout.txt").write_text(held_text, encoding="utf-8")
    held_ids = encode_documents(tokenizer, held_text.rstrip("\n").split(DOC_SEPARATOR),
                                config.bos_token, config.eos_token)
    log(f"[tokenizer] {len(stream):,} training tokens ({corpus['train_chars'] / len(stream):.2f} "
        f"chars/token), {len(held_ids):,} held-out tokens; {time.time() - begin:.0f} s")

    params, training = train(config, stream, args, log)

    model = build_model(config)
    ppl_float, count = perplexity(model, params, held_ids)
    log(f"[eval] held-out perplexity, float32 weights: {ppl_float:.3f} over {count} tokens")
    usage = expert_usage(config, params, held_ids)
    log(f"[eval] expert usage per layer: {usage}")

    write_ckpt0(quantized(params), out, config)
    shutil.copyfile(args.config, out / "config.yaml")
    shipped = load_params(out, load_config(out / "config.yaml"), kind="ckpt-0")
    ppl_int8, _ = perplexity(model, shipped, held_ids)
    change = 100 * (ppl_int8 / ppl_float - 1)
    log(f"[eval] held-out perplexity, int8 weights as read back: {ppl_int8:.3f} ({change:+.2f}%)")

    ffn = config.ffn_size
    per_layer_active = (config.emb_size * config.key_size * (2 * config.num_q_heads
                                                             + 2 * config.num_kv_heads)
                        + config.emb_size * config.num_experts
                        + 3 * config.num_selected_experts * config.emb_size * ffn
                        + 4 * config.emb_size)
    metrics = {
        "seed": args.seed, "args": {k: v for k, v in vars(args).items()
                                    if k in ("lr", "warmup", "final_lr_fraction",
                                             "weight_decay", "clip", "balance")},
        "config": config.to_dict(), "ffn_size": ffn,
        "active_parameters": config.num_layers * per_layer_active
        + config.vocab_size * config.emb_size + config.emb_size,
        "corpus": corpus, "train_tokens": int(len(stream)), "heldout_tokens": count,
        "training": training, "expert_usage": usage,
        "perplexity_float": round(ppl_float, 4), "perplexity_int8": round(ppl_int8, 4),
        "int8_change_percent": round(change, 3),
        "machine": f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
                   f"{__import__('os').cpu_count()} cores",
        "files": len(list((out / "ckpt-0").iterdir())),
        "total_seconds": round(time.time() - begin, 1),
    }
    finish(out, metrics, log)
    log(f"[done] {out}: {directory_bytes(out) / 1e6:.1f} MB, {metrics['total_seconds'] / 60:.1f} "
        f"min in all")
    if abs(change) >= 1.0:
        log("[done] WARNING: int8 perplexity is not within 1% of float")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
