"""GGUF files (llama.cpp's format) written with the `gguf` package's writer from the HF
fixtures (tests/gguf_helpers.py, as convert_hf_to_gguf writes them): the same logits as the HF
path (bit-exact for F32; Q8_0 against the HF path on gguf's own dequantized values), exact
int8 leaves, greedy tokens, tokenizers from the metadata, hostile files."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")  # llama.cpp's package: reader, writer, quants

from conftest import ROOT, single_device_mesh  # noqa: E402
from gguf_helpers import (bpe_vocab_writer, permute, spm_vocab_writer,  # noqa: E402
                          write_dequantized_hf_copy, write_model_gguf)
from runtime.checkpoint.gguf_reader import rope_rows  # noqa: E402
from runtime.checkpoint.hf_config import read_hf_config  # noqa: E402
from runtime.checkpoint.load import (default_config, detect_format,  # noqa: E402
                                     load_params, load_params_on_mesh)
from runtime.engine import build_engine  # noqa: E402
from runtime.errors import CheckpointError  # noqa: E402
from runtime.gguf_tokenizer import gguf_chat_template, gguf_tokenizer  # noqa: E402
from runtime.memory import empty_kv  # noqa: E402
from runtime.models import build_model  # noqa: E402
from runtime.quant import QuantizedEmbedding, QuantizedWeight8bit, dequantize  # noqa: E402
from runtime.request import Request  # noqa: E402

HF = ROOT / "tests" / "fixtures" / "hf"
TOKENIZERS = ROOT / "tests" / "fixtures" / "tokenizers"
GROK_SPM = ROOT.parent / "shared" / "fixtures" / "grok-1-tokenizer.model"
LAYER = "language_model/transformer/layers/decoder_layer/"


def forward(config, params, ids):
    length = ids.shape[1]
    kv = empty_kv(config, 1, length, jnp.float32)
    logits, _, _ = jax.jit(build_model(config).apply)(params, jnp.asarray(ids), kv, kv,
                                                     jnp.arange(length)[None])
    return np.asarray(logits)


def long_ids(name):
    return np.load(HF / name / "expected.npz")["long_ids"]


def test_rope_rows_undo_the_converters_permutation():
    w = np.arange(4 * 16 * 3).reshape(64, 3)
    for heads in (4, 2, 8):
        np.testing.assert_array_equal(permute(w, heads)[rope_rows(64, heads)], w)


@pytest.mark.parametrize("name", ["llama", "mixtral", "mistral"])
def test_f32_gguf_gives_the_hf_logits_bit_for_bit(tmp_path, name):
    path = tmp_path / f"{name}.gguf"
    write_model_gguf(HF / name, path, "F32")
    assert detect_format(path) == "gguf"
    config, hf_config = default_config(path), read_hf_config(HF / name)
    assert config == hf_config  # the metadata gives the config.json's model
    got = forward(config, load_params(path, config), long_ids(name))
    want = forward(hf_config, load_params(HF / name, hf_config), long_ids(name))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_q8_0_loads_as_exact_int8_and_matches_the_dequantized_hf_path(tmp_path, name):
    path = tmp_path / f"{name}.gguf"
    written = write_model_gguf(HF / name, path, "Q8_0")
    config = default_config(path)
    params = load_params(path, config)
    query = params[LAYER + "multi_head_attention/query"]["w"]
    assert isinstance(query, QuantizedWeight8bit) and query.scales.dtype == np.float16
    assert query.scales.shape == (config.num_layers, config.emb_size // 32,
                                  config.num_q_heads * config.key_size)
    table = params["language_model/in_out_embed"]["embeddings"]
    assert isinstance(table, QuantizedEmbedding)
    # every int8 leaf dequantizes to gguf's own dequantization of the file, bit for bit
    q8 = gguf.GGMLQuantizationType.Q8_0
    key = written["blk.1.attn_k.weight"]
    want_key = gguf.quants.dequantize(gguf.quants.quantize(key, q8), q8)
    want_key = want_key[rope_rows(len(key), config.num_kv_heads)].T  # HF order, [in, out]
    got_key = dequantize(QuantizedWeight8bit(np.asarray(params[LAYER + "multi_head_attention/key"]
                                                        ["w"].weight[1]),
                                             np.asarray(params[LAYER + "multi_head_attention/key"]
                                                        ["w"].scales[1])))
    np.testing.assert_array_equal(got_key, want_key)
    embd = written["token_embd.weight"]
    np.testing.assert_array_equal(dequantize(table),
                                  gguf.quants.dequantize(gguf.quants.quantize(embd, q8), q8))
    reference = tmp_path / "dequantized"
    write_dequantized_hf_copy(HF / name, reference)
    hf_config = read_hf_config(reference)
    got = forward(config, params, long_ids(name))
    want = forward(hf_config, load_params(reference, hf_config), long_ids(name))
    error = np.abs(got - want).max() / np.abs(want).max()
    print(f"{name} Q8_0 vs HF on dequantized weights: max relative logit error {error:.2e}, "
          f"top-1 agreement {np.mean(got.argmax(-1) == want.argmax(-1)):.3f}")
    # int8 products sum per 32-row block, then scale: float32 rounding order only
    assert error < 1e-5 and (got.argmax(-1) == want.argmax(-1)).all()


def test_q8_0_on_the_mesh_and_greedy_tokens_equal(tmp_path):
    path = tmp_path / "mistral.gguf"
    write_model_gguf(HF / "mistral", path, "Q8_0")
    config = default_config(path)
    mesh = single_device_mesh()
    on_mesh = load_params_on_mesh(path, config, mesh, kind="gguf")
    host = load_params(path, config)
    for module, leaves in host.items():
        for param, leaf in leaves.items():
            for a, b in zip(jax.tree.leaves(leaf), jax.tree.leaves(on_mesh[module][param])):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    reference = tmp_path / "dequantized"
    write_dequantized_hf_copy(HF / "mistral", reference)
    hf_config = read_hf_config(reference)
    prompts = [tuple(np.load(HF / "mistral" / "expected.npz")[f"prompt_{i}"].tolist())
               for i in range(2)]
    outputs = []
    for cfg, params in ((config, on_mesh), (hf_config, load_params(reference, hf_config))):
        engine = build_engine(cfg, params, mesh, slots=2, cache_length=64)
        outputs.append([r.output_ids for r in engine.generate(
            [Request(p, max_new_tokens=24) for p in prompts])])
    assert outputs[0] == outputs[1]


def _write(path, fill, arch="llama"):
    writer = gguf.GGUFWriter(str(path), arch)
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("name", ["bos_template", "no_bos_template", "llama_add_bos_false",
                                  "llama_add_eos_true"])
def test_gpt2_vocabulary_tokenizes_as_the_tokenizer_json(tmp_path, name):
    import tokenizers
    expected = json.loads((TOKENIZERS / "expected.json").read_text())
    texts = expected["texts"] + ["Hello  world\n\n  x", "<|end_of_text|> 12345 'll 'S"]
    source = json.loads((TOKENIZERS / name / "tokenizer.json").read_text())
    settings = json.loads((TOKENIZERS / name / "tokenizer_config.json").read_text())

    def fill(writer):
        bpe_vocab_writer(TOKENIZERS / name / "tokenizer.json", {}, "gpt-2")(writer)
        gguf.SpecialVocab(TOKENIZERS / name, load_merges=False).add_to_gguf(writer)
    tok = gguf_tokenizer(_write(tmp_path / "t.gguf", fill))
    reference = tokenizers.Tokenizer.from_str(json.dumps(source))
    for text in texts:
        plain = reference.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_special_tokens=False) == plain, text
        assert tok.decode(plain) == reference.decode(plain, skip_special_tokens=False)
    # BOS / EOS as the metadata says (what the converter's SpecialVocab wrote)
    add_bos = settings.get("add_bos_token", "TemplateProcessing" in json.dumps(
        source["post_processor"]))
    add_eos = settings.get("add_eos_token", False)
    assert tok.encode("hi") == [0] * add_bos + tok.encode("hi", False) + [1] * add_eos
    if name in ("bos_template", "no_bos_template"):  # there transformers agrees
        assert [tok.encode(t) for t in expected["texts"]] == expected["ids"][name]


def test_llama3_pre_tokenizer(tmp_path):
    """tokenizer.ggml.pre "llama-bpe": Llama 3's split regex and whole-word lookup, against a
    tokenizer.json with Llama 3's pre-tokenizer over the same vocabulary."""
    import tokenizers
    from runtime.gguf_tokenizer import PRE
    source = json.loads((TOKENIZERS / "bos_template" / "tokenizer.json").read_text())
    source["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": PRE["llama-bpe"][0]}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]}
    source["model"]["ignore_merges"] = True
    reference = tokenizers.Tokenizer.from_str(json.dumps(source))
    tok = gguf_tokenizer(_write(tmp_path / "t.gguf", bpe_vocab_writer(
        TOKENIZERS / "bos_template" / "tokenizer.json", {"bos_token": "<|begin_of_text|>"},
        "llama-bpe")))
    for text in ("Numbers 1234567 and 'RE words\r\n\n  spaced", "émigré naïve 🙂", ""):
        assert tok.encode(text, False) == reference.encode(text, add_special_tokens=False).ids
    assert tok.encode("x")[0] == 0  # llama-bpe adds BOS by default (llama.cpp)


@pytest.mark.skipif(not GROK_SPM.is_file(), reason="needs ../shared/fixtures")
def test_llama_vocabulary_tokenizes_as_sentencepiece(tmp_path):
    """tokenizer.ggml.model "llama" (scores, byte pieces) against the SentencePiece model it
    was written from (131072 pieces)."""
    from runtime.tokenizer import Tokenizer
    tok = gguf_tokenizer(_write(tmp_path / "t.gguf", spm_vocab_writer(GROK_SPM, add_bos=True)))
    spm = Tokenizer(GROK_SPM)
    for text in ("Hello world  the  quick 12345", "日本語 ŝĉĝ 🙂🙃", "[BOS]x[EOS] y", " lead",
                 "trail ", "a\n\n\n\n\nb\tc", "émigré naïve", ""):
        assert tok.encode(text, False) == spm.encode(text, False), text
    assert tok.encode("hi") == [1] + spm.encode("hi", False)


def test_chat_template_from_metadata(tmp_path):
    def fill(writer):
        bpe_vocab_writer(TOKENIZERS / "bos_template" / "tokenizer.json",
                         {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                          "chat_template": "{{ bos_token }}{% for m in messages %}"
                                           "{{ m['content'] }}{% endfor %}"}, "gpt-2")(writer)
    path = _write(tmp_path / "t.gguf", fill)
    template, specials = gguf_chat_template(path)
    assert specials == {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    from runtime.chat_template import ChatTemplate
    rendered = ChatTemplate(path, template, specials).encode(
        gguf_tokenizer(path), [{"role": "user", "content": "hi"}])
    assert rendered == [0, 73, 74]


def test_hostile_files_are_one_line_errors(tmp_path):
    good = tmp_path / "good.gguf"
    write_model_gguf(HF / "llama", good, "Q8_0")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[:len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"truncated.gguf: tensor \S+: data ends at byte"):
        default_config(truncated)
    cut_header = tmp_path / "header.gguf"
    cut_header.write_bytes(data[:200])
    with pytest.raises(CheckpointError, match="header.gguf: not a readable GGUF file"):
        default_config(cut_header)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"GGML" + data[4:100])
    with pytest.raises(CheckpointError, match="x.gguf is named .gguf but does not start"):
        detect_format(not_gguf)
    # an unknown type code in the first tensor's info (its 4 bytes after the dims)
    reader = gguf.GGUFReader(str(good))
    field = reader.tensors[0].field
    type_offset = field.offset + sum(p.nbytes for p in field.parts[:4])
    unknown = tmp_path / "unknown.gguf"
    unknown.write_bytes(data[:type_offset] + struct.pack("<I", 99) + data[type_offset + 4:])
    with pytest.raises(CheckpointError, match=f"tensor {reader.tensors[0].name}: unknown GGML "
                                              f"type code 99"):
        default_config(unknown)


def test_unsupported_types_and_architectures_are_named(tmp_path):
    q4 = tmp_path / "q4.gguf"
    write_model_gguf(HF / "llama", q4, "Q4_0")
    with pytest.raises(CheckpointError) as error:
        load_params(q4, default_config(q4))
    assert "tensor token_embd.weight: GGML type Q4_0 is not supported" in str(error.value)
    assert "later step of issue 23" in str(error.value)
    falcon = tmp_path / "falcon.gguf"
    write_model_gguf(HF / "llama", falcon, "F32", arch="falcon")
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'falcon'"):
        default_config(falcon)
