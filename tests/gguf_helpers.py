"""GGUF files written with the `gguf` package's own writer, as llama.cpp's convert_hf_to_gguf
writes them: from the HF fixtures (q/k rows permuted for llama.cpp's RoPE, experts stacked) and
from a tokenizer.json's vocabulary (gpt2 BPE) or a SentencePiece model's (llama)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from runtime.checkpoint.safetensors_io import SafetensorsFile


def permute(weights, n_head, n_head_kv=None):
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
         "output_norm.weight", "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "block_sparse_moe.gate": "ffn_gate_inp"}
EXPERTS = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def hf_tensors(folder: Path) -> dict:
    """GGUF name -> float32 array (numpy layout [out, in]) of an HF fixture, as the converter
    maps and permutes them."""
    hf = json.loads((folder / "config.json").read_text())
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads")
    f = SafetensorsFile(folder / "model.safetensors")
    out, experts = {}, {}
    for name in f.keys():
        value = np.asarray(f.get(name), np.float32)
        if name in NAMES:
            out[NAMES[name]] = value
            continue
        parts = name.split(".")
        layer, rest = int(parts[2]), ".".join(parts[3:-1])
        if rest.startswith("block_sparse_moe.experts."):
            expert, which = int(parts[5]), parts[6]
            experts.setdefault((layer, EXPERTS[which]), {})[expert] = value
            continue
        if rest == "self_attn.q_proj":
            value = permute(value, heads, heads)
        elif rest == "self_attn.k_proj":
            value = permute(value, heads, kv)
        out[f"blk.{layer}.{LAYER[rest]}.weight"] = value
    for (layer, gguf_name), by_expert in experts.items():
        out[f"blk.{layer}.{gguf_name}.weight"] = np.stack([by_expert[e]
                                                          for e in sorted(by_expert)])
    return out


def model_metadata(writer, hf: dict, vocab_tokens: bool = True) -> None:
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_head_count_kv(hf["num_key_value_heads"])
    writer.add_key_length(hf["head_dim"])
    writer.add_value_length(hf["head_dim"])
    writer.add_rope_dimension_count(hf["head_dim"])
    writer.add_rope_freq_base(hf["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    if hf.get("num_local_experts"):
        writer.add_expert_count(hf["num_local_experts"])
        writer.add_expert_used_count(hf["num_experts_per_tok"])
    if hf.get("sliding_window"):
        writer.add_sliding_window(hf["sliding_window"])
    if vocab_tokens:  # a bare vocabulary, for files without a tokenizer of their own
        writer.add_tokenizer_model("llama")
        writer.add_token_list([f"<t{i}>" for i in range(hf["vocab_size"])])
        writer.add_token_scores([0.0] * hf["vocab_size"])  # (run.py reads them)
        writer.add_token_types([1] * hf["vocab_size"])


def write_model_gguf(folder: Path, path: Path, qtype: str = "F32", tokenizer=None,
                     arch: str = "llama", extra: dict | None = None) -> dict:
    """The HF fixture `folder` as a GGUF at `path`, matrices in `qtype` (F32, F16, Q8_0; norms
    stay F32, as the converter keeps them); tokenizer(writer): writes the vocabulary instead of
    bare tokens; extra: more tensors, written as given. Returns the tensors as written (float32,
    GGUF layout, before quantising)."""
    import gguf
    hf = json.loads((folder / "config.json").read_text())
    tensors = hf_tensors(folder)
    writer = gguf.GGUFWriter(str(path), arch)
    model_metadata(writer, hf, vocab_tokens=tokenizer is None)
    if tokenizer is not None:
        tokenizer(writer)
    kind = gguf.GGMLQuantizationType[qtype]
    for name, value in (extra or {}).items():  # written as they are (e.g. rope_freqs)
        writer.add_tensor(name, value)
    for name, value in tensors.items():
        # the converter keeps norms, and rows that are not whole blocks, in float
        if value.ndim == 1 or qtype == "F32" or value.shape[-1] % 32:
            writer.add_tensor(name, value)
        elif qtype == "F16":
            writer.add_tensor(name, value.astype(np.float16))
        else:
            data = gguf.quants.quantize(value, kind)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def bpe_vocab_writer(tokenizer_json: Path, config: dict, pre: str, size: int | None = None):
    """A writer callback: the gpt2 vocabulary of a tokenizer.json as the converter writes it
    (tokens by id, merges, added special tokens as CONTROL), padded to `size` with [PAD{i}]."""
    import gguf
    t = json.loads(tokenizer_json.read_text())
    vocab = dict(t["model"]["vocab"])
    specials = {a["content"]: a["id"] for a in t["added_tokens"]}
    vocab.update(specials)
    n = max(size or 0, max(vocab.values()) + 1)
    by_id = {i: s for s, i in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    types = [gguf.TokenType.CONTROL if tok in specials else gguf.TokenType.NORMAL
             if i in by_id else gguf.TokenType.UNUSED for i, tok in enumerate(tokens)]
    merges = [" ".join(m) if isinstance(m, list) else m for m in t["model"]["merges"]]

    def write(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        for key, name in (("bos", "bos_token"), ("eos", "eos_token")):
            if config.get(name) in vocab:
                getattr(writer, f"add_{key}_token_id")(vocab[config[name]])
        for key in ("add_bos_token", "add_eos_token"):
            if key in config:
                getattr(writer, f"add_{key}")(config[key])
        if "chat_template" in config:
            writer.add_chat_template(config["chat_template"])
    return write


def spm_vocab_writer(model_path: Path, add_bos: bool | None = None):
    """A writer callback: a SentencePiece model's vocabulary as convert_hf_to_gguf's
    _create_vocab_sentencepiece writes it (pieces, scores, types; BOS/EOS/UNK ids)."""
    import gguf
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor()
    sp.LoadFromSerializedProto(Path(model_path).read_bytes())
    tokens, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL
                     if sp.IsControl(i) else gguf.TokenType.UNUSED if sp.IsUnused(i) else
                     gguf.TokenType.BYTE if sp.IsByte(i) else gguf.TokenType.NORMAL)

    def write(writer):
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        for key, value in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id())):
            if value >= 0:
                getattr(writer, f"add_{key}_token_id")(value)
        if add_bos is not None:
            writer.add_add_bos_token(add_bos)
    return write


def write_dequantized_hf_copy(folder: Path, out: Path, qtype: str = "Q8_0",
                              overrides: dict | None = None) -> None:
    """The HF fixture with every matrix the GGUF writer quantises replaced by its quantised
    values as `gguf.quants.dequantize` gives them (row-wise blocks: the q/k row permutation
    commutes with it), for the HF path to run on the same values; overrides: HF tensor name
    -> the values to write instead (what the runtime holds of a tensor, taken from it)."""
    import gguf
    from runtime.checkpoint.safetensors_io import save_safetensors
    import shutil
    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    f = SafetensorsFile(folder / "model.safetensors")
    kind = gguf.GGMLQuantizationType[qtype]
    tensors = {}
    for name in f.keys():
        value = np.asarray(f.get(name), np.float32)
        if value.ndim == 2 and value.shape[-1] % 32 == 0:
            value = gguf.quants.dequantize(gguf.quants.quantize(value, kind), kind)
        value = (overrides or {}).get(name, value)
        tensors[name] = np.ascontiguousarray(value, np.float32)
    save_safetensors(tensors, out / "model.safetensors")


# A llama whose every matrix row is whole 256-value K-quant super-blocks (the HF fixtures'
# 64- and 96-wide rows are not), for the K-quant tests: config.json's fields.
KQUANT_MODEL = dict(max_position_embeddings=128, hidden_size=256, num_hidden_layers=2,
                    intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=64, rope_parameters={"rope_theta": 10000.0}, rms_norm_eps=1e-5,
                    vocab_size=64)


def kquant_model_shapes(hf: dict = KQUANT_MODEL) -> dict:
    """GGUF name -> numpy shape [out, in] of the model's tensors (norms: [width]), with its own
    output.weight."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from bench_llamacpp import gguf_shapes
    return gguf_shapes(dict(hf, tie_word_embeddings=False))


def random_blocks(qtype: str, shape: tuple, rng) -> np.ndarray:
    """Valid quantised data (uint8 [..., rows, row bytes]) of GGUF type `qtype` for a tensor
    of numpy shape `shape`: gguf's own quantisation of random weights where gguf-py has one,
    else random bytes (every code and 6-bit scale is valid) with small fp16 d / dmin."""
    import gguf
    kind = gguf.GGMLQuantizationType[qtype]
    try:
        return gguf.quants.quantize(rng.normal(0, 0.05, shape).astype(np.float32), kind)
    except NotImplementedError:
        pass
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (*shape[:-1], shape[-1] // block, size), dtype=np.uint8)
    # where each type keeps its fp16 super-block scale(s): d and dmin first, Q6_K's d last
    where = {"Q6_K": [size - 2], "Q3_K": [size - 2], "Q2_K": [size - 4, size - 2]}.get(
        qtype, [0, 2] if qtype in ("Q4_K", "Q5_K") else [])
    for offset in where:
        d = rng.uniform(1e-5, 1e-4, raw.shape[:-1]).astype(np.float16)
        raw[..., offset:offset + 2] = d[..., None].view(np.uint8)
    return raw.reshape(*shape[:-1], -1)


def write_tensors_gguf(path: Path, tensors: dict, hf: dict = KQUANT_MODEL) -> None:
    """A llama GGUF of `tensors` (name -> (array, GGUF type name)): float32 arrays as F32,
    uint8 quantised data as raw data of its type; the metadata of the config.json fields hf."""
    import gguf
    writer = gguf.GGUFWriter(str(path), "llama")
    model_metadata(writer, hf)
    for name, (value, qtype) in tensors.items():
        if qtype == "F32":
            writer.add_tensor(name, np.asarray(value, np.float32))
        else:
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(name, value, raw_shape=value.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dequantized(value: np.ndarray, qtype: str) -> np.ndarray:
    """gguf-py's float32 values of a tensor written by write_tensors_gguf."""
    import gguf
    if qtype == "F32":
        return np.asarray(value, np.float32)
    return gguf.quants.dequantize(value, gguf.GGMLQuantizationType[qtype])


def llama3_rope_factors(hf: dict) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for config.json's "llama3" RoPE: per
    frequency, the divisor of its inverse frequency (1 for short wavelengths, the factor for
    long ones, interpolated between)."""
    rope, head = hf["rope_parameters"], hf["head_dim"]
    inv_freq = 1.0 / rope["rope_theta"] ** (np.arange(0, head, 2) / head)
    wavelen = 2 * np.pi / inv_freq
    original, factor = rope["original_max_position_embeddings"], rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    smooth = (original / wavelen - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0,
                    np.where(wavelen > original / low, factor, between)).astype(np.float32)


def kquant_files(tmp_path):
    """A Q4_K_M-like file of the K-quant model (Q4_K, Q6_K in attn_v's first layer, Q5_K
    ffn_up, Q8_0 + Q6_K ffn_down, Q2_K + Q3_K attention output (one int8 stack in groups of
    16, Q2_K's mins), Q6_K table and head) and an F32 file of the values the
    runtime should hold: gguf-py's dequantisation of each."""
    rng = np.random.default_rng(5)
    types = {"token_embd": "Q6_K", "output": "Q6_K", "blk.0.attn_v": "Q6_K",
             "blk.0.ffn_down": "Q8_0", "blk.1.ffn_down": "Q6_K", "blk.0.ffn_up": "Q5_K",
             "blk.1.ffn_up": "Q5_K", "blk.0.attn_output": "Q2_K", "blk.1.attn_output": "Q3_K"}
    tensors, floats = {}, {}
    for name, shape in kquant_model_shapes().items():
        qtype = "F32" if len(shape) == 1 else types.get(name[:-len(".weight")], "Q4_K")
        value = rng.uniform(0.8, 1.2, shape) if qtype == "F32" else \
            random_blocks(qtype, shape, rng)
        tensors[name] = (value, qtype)
        floats[name] = (dequantized(value, qtype), "F32")
    write_tensors_gguf(tmp_path / "k.gguf", tensors)
    write_tensors_gguf(tmp_path / "f32.gguf", floats)
    return tmp_path / "k.gguf", tmp_path / "f32.gguf"
