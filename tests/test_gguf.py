"""GGUF files (llama.cpp's format) written with the `gguf` package's writer from the HF
fixtures (tests/gguf_helpers.py, as convert_hf_to_gguf writes them): the same logits as the HF
path (bit-exact for F32; Q8_0 / Q4_0 / Q4_1 against the HF path on gguf's own dequantized
values), exact int8 and int4 leaves of every quantised type (K-quants from random valid blocks,
gguf-py having no quantiser for them), slices reading only their blocks, greedy tokens,
tokenizers from the metadata, hostile files and unsupported types."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")  # llama.cpp's package: reader, writer, quants

from conftest import ROOT, single_device_mesh  # noqa: E402
from gguf_helpers import (bpe_vocab_writer, dequantized, kquant_files,  # noqa: E402
                          kquant_model_shapes,
                          llama3_rope_factors,
                          permute, random_blocks, spm_vocab_writer, write_dequantized_hf_copy,
                          write_model_gguf, write_tensors_gguf)
from runtime.checkpoint import gguf_source, lazy  # noqa: E402
from runtime.checkpoint.gguf_file import open_gguf  # noqa: E402
from runtime.checkpoint.gguf_reader import (Piece, Source, _quantized_leaf,  # noqa: E402
                                            lazy_gguf, rope_rows, weight_format)
from runtime.checkpoint.lazy import BYTES_READ, LazyParam  # noqa: E402
from runtime.checkpoint.hf_config import read_hf_config  # noqa: E402
from runtime.checkpoint.load import (default_config, detect_format,  # noqa: E402
                                     load_params, load_params_on_mesh)
from runtime.engine import build_engine  # noqa: E402
from runtime.errors import CheckpointError  # noqa: E402
from runtime.gguf_tokenizer import gguf_chat_template, gguf_tokenizer  # noqa: E402
from runtime.memory import empty_kv  # noqa: E402
from runtime.models import build_model  # noqa: E402
from runtime.quant import QuantizedEmbedding, QuantizedWeight8bit, dequantize  # noqa: E402
from runtime.quant4 import QuantizedWeight4bit, dequantize_int4  # noqa: E402
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


def test_llama3_rope_freqs_give_the_hf_logits(tmp_path):
    """Llama 3.x files carry their RoPE scaling as the rope_freqs tensor: read into the config
    (rope_freq_factors), the logits equal the HF path's (config.json's llama3 parameters)."""
    hf = json.loads((HF / "llama3" / "config.json").read_text())
    factors = llama3_rope_factors(hf)
    assert 1.0 < factors.max() and factors.min() == 1.0  # the fixture scales some frequencies
    path = tmp_path / "llama3.gguf"
    write_model_gguf(HF / "llama3", path, "F32", extra={"rope_freqs.weight": factors})
    config, hf_config = default_config(path), read_hf_config(HF / "llama3")
    assert config.rope_freq_factors == tuple(float(f) for f in factors)
    got = forward(config, load_params(path, config), long_ids("llama3"))
    want = forward(hf_config, load_params(HF / "llama3", hf_config), long_ids("llama3"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    plain = config.replace(rope_freq_factors=())  # and the factors matter
    assert np.abs(forward(plain, load_params(path, config), long_ids("llama3")) - want).max() \
        > 1e-3 * np.abs(want).max()
    bad = tmp_path / "bad.gguf"
    write_model_gguf(HF / "llama3", bad, "F32", extra={"rope_freqs.weight": factors[:-1]})
    with pytest.raises(CheckpointError, match=f"^{bad}: tensor rope_freqs.weight must be F32 "
                                              r"\[4\][^\n]*$"):
        default_config(bad)


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_q8_0_loads_as_exact_int8_and_matches_the_dequantized_hf_path(tmp_path, name):
    path = tmp_path / f"{name}.gguf"
    written = write_model_gguf(HF / name, path, "Q8_0")
    config = default_config(path)
    before = BYTES_READ.bytes
    params = load_params(path, config)
    # the load report's count: each byte of the tensors once (values and scales apart)
    assert BYTES_READ.bytes - before == sum(t.n_bytes for t in open_gguf(path).tensors)
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
        {"type": "Split", "pattern": {"Regex": PRE["llama-bpe"][0][0]}, "behavior": "Isolated",
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


def test_smollm_pre_tokenizer_splits_digits_then_as_gpt2(tmp_path):
    """tokenizer.ggml.pre "smollm" (and its family), against a tokenizer.json with SmolLM's
    own pre-tokenizer (HF's Digits(individual_digits) then ByteLevel's GPT-2 split) over the
    same vocabulary."""
    import tokenizers
    source = json.loads((TOKENIZERS / "bos_template" / "tokenizer.json").read_text())
    source["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": True}]}
    reference = tokenizers.Tokenizer.from_str(json.dumps(source))
    tok = gguf_tokenizer(_write(tmp_path / "t.gguf", bpe_vocab_writer(
        TOKENIZERS / "bos_template" / "tokenizer.json", {}, "smollm")))
    texts = ("Numbers 1234567 and x2 'll words\r\n\n  spaced 3.14", "émigré naïve 🙂 ٣٤", "",
             " 12 ")
    for text in texts:
        assert tok.encode(text, False) == reference.encode(text, add_special_tokens=False).ids
    plain = gguf_tokenizer(_write(tmp_path / "g.gguf", bpe_vocab_writer(
        TOKENIZERS / "bos_template" / "tokenizer.json", {}, "gpt-2")))
    for text in texts:  # the pieces themselves (this vocabulary merges no digits)
        pieces = [p for p, _ in tok._tok.pre_tokenizer.pre_tokenize_str(text)]
        assert pieces == [p for p, _ in reference.pre_tokenizer.pre_tokenize_str(text)], text
    pieces = [p for p, _ in tok._tok.pre_tokenizer.pre_tokenize_str("x 1234")]
    assert pieces == ["x", "Ġ", "1", "2", "3", "4"]
    assert [p for p, _ in plain._tok.pre_tokenizer.pre_tokenize_str("x 1234")] == ["x", "Ġ1234"]


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


def _forge_types(path, out, old: str, new: str, count=None):
    """A copy of the GGUF at `path` with the type code of (the first `count`) tensors of type
    `old` replaced by `new` (4 bytes after each tensor's dims in its info)."""
    data = bytearray(path.read_bytes())
    reader = gguf.GGUFReader(str(path))
    forged = [t for t in reader.tensors if t.tensor_type.name == old][:count]
    for tensor in forged:
        field = tensor.field
        offset = field.offset + sum(p.nbytes for p in field.parts[:4])
        data[offset:offset + 4] = struct.pack("<I", int(gguf.GGMLQuantizationType[new]))
    out.write_bytes(bytes(data))
    return [t.name for t in forged]


def test_unsupported_types_and_architectures_are_named(tmp_path):
    q4 = tmp_path / "q4.gguf"
    write_model_gguf(HF / "llama", q4, "Q4_0")
    # IQ4_NL has Q4_0's block geometry, so the forged file is whole: only the type is wrong
    first = _forge_types(q4, tmp_path / "iq4.gguf", "Q4_0", "IQ4_NL", count=1)[0]
    with pytest.raises(CheckpointError) as error:
        load_params(tmp_path / "iq4.gguf", default_config(tmp_path / "iq4.gguf"))
    assert str(error.value) == (f"{tmp_path / 'iq4.gguf'}: tensor {first} has GGML type IQ4_NL, "
                                f"which is not supported; supported: F32, F16, BF16, Q8_0, "
                                f"Q5_0, Q6_K, Q4_0, Q4_1, Q4_K, Q5_1, Q5_K, Q3_K, Q2_K")
    names = _forge_types(q4, tmp_path / "all.gguf", "Q4_0", "IQ4_NL")
    with pytest.raises(CheckpointError) as error:
        load_params(tmp_path / "all.gguf", default_config(tmp_path / "all.gguf"))
    message = str(error.value)
    assert "\n" not in message and f"tensor {names[0]} has GGML type IQ4_NL" in message
    assert f"(and {len(names) - 1} more: {len(names) - 1} IQ4_NL)" in message
    falcon = tmp_path / "falcon.gguf"
    write_model_gguf(HF / "llama", falcon, "F32", arch="falcon")
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'falcon'"):
        default_config(falcon)


# ---- quantised types, tensor by tensor (no model): every supported type as a stacked [2, 24,
# 512] matrix and a [24, 512] table (numpy layout; 512 = two K-quant super-blocks a row)
QUANTS = ("Q8_0", "Q5_0", "Q6_K", "Q4_0", "Q4_1", "Q4_K", "Q5_1", "Q5_K", "Q3_K", "Q2_K")
EXACT_INT8 = {"Q8_0": (32, np.float16), "Q5_0": (32, np.float16), "Q6_K": (16, np.float32),
              "Q5_1": (32, np.float16), "Q5_K": (32, np.float32)}  # the last two with mins
ASYMMETRIC = ("Q4_1", "Q4_K", "Q5_1", "Q5_K", "Q2_K")
INT4 = {"Q4_0": (32, np.float16), "Q4_1": (32, np.float16), "Q4_K": (32, np.float32),
        "Q3_K": (16, np.float32), "Q2_K": (16, np.float32)}  # group, scale dtype


@pytest.fixture(scope="module")
def typed_file(tmp_path_factory):
    rng = np.random.default_rng(23)
    tensors = {}
    for qtype in QUANTS:
        tensors[qtype] = (random_blocks(qtype, (2, 24, 512), rng), qtype)
        tensors[qtype + ".table"] = (random_blocks(qtype, (24, 512), rng), qtype)
    path = tmp_path_factory.mktemp("types") / "types.gguf"
    write_tensors_gguf(path, tensors)
    return path, {name: dequantized(*value) for name, value in tensors.items()}


def _source(path, name):
    tensor = next(t for t in open_gguf(path).tensors if t.name == name)
    return Source(tensor, tensor.tensor_type.name, None)


def _parts(leaf):
    """The LazyParams of a lazy leaf."""
    return [part for part in jax.tree.leaves(leaf, is_leaf=lambda x: isinstance(x, LazyParam))]


def _read(leaf):
    return jax.tree.map(lambda part: part.read(None), leaf,
                        is_leaf=lambda x: isinstance(x, LazyParam))


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("qtype", QUANTS)
def test_each_type_loads_as_the_files_own_dequantization(typed_file, qtype, chunked,
                                                         monkeypatch):
    """chunked: a row of blocks read at a time, transposed by XLA (gguf_source: big tensors)."""
    if chunked:
        monkeypatch.setattr(gguf_source, "READ_CHUNK_BYTES", 1)
        monkeypatch.setattr(lazy, "XLA_TRANSPOSE_BYTES", 0)
    path, want = typed_file
    matrix, table = _source(path, qtype), _source(path, qtype + ".table")
    np.testing.assert_array_equal(matrix.floats((slice(0, 2),), range(24), range(512)),
                                  want[qtype])  # what a float parameter (the router) gets
    before = BYTES_READ.bytes
    leaf = _quantized_leaf((2, 512, 24), [Piece(matrix, (), "matrix")], table=False)
    host = _read(leaf)
    ours = np.swapaxes(want[qtype], -1, -2)  # [2, I, O]
    if qtype in INT4:
        group, dtype = INT4[qtype]
        assert isinstance(host, QuantizedWeight4bit) and host.packed.shape == (2, 256, 24)
        assert host.scales.dtype == dtype and host.scales.shape == (2, 512 // group, 24)
        assert (host.mins is not None) == (qtype in ASYMMETRIC)
        np.testing.assert_array_equal(dequantize_int4(host), ours)
    else:
        group, dtype = EXACT_INT8[qtype]
        assert isinstance(host, QuantizedWeight8bit) and host.weight.dtype == np.int8
        assert host.scales.dtype == dtype and host.scales.shape == (2, 512 // group, 24)
        assert (host.mins is not None) == (qtype in ASYMMETRIC)
        if host.mins is not None:
            assert host.mins.dtype == dtype and host.mins.shape == host.scales.shape
        np.testing.assert_array_equal(dequantize(host), ours)
    # each byte of the tensor read once (Q4_K, Q5_K, Q2_K: their 12 or 16 scale bytes for
    # scales and mins)
    extra = {"Q4_K": 12, "Q5_K": 12, "Q2_K": 16}.get(qtype, 0) * 2 * 24 * 2
    assert BYTES_READ.bytes - before == open_gguf(path).tensors[
        QUANTS.index(qtype) * 2].n_bytes + extra
    # the embedding table [V, D]: int8 with scales (and mins) [D / group, V], exact for every
    # type (Q4_0: q - 8; the asymmetric ones: q with their mins)
    embedding = _read(_quantized_leaf((24, 512), [Piece(table, (), "table")], table=True))
    assert isinstance(embedding, QuantizedEmbedding)
    assert (embedding.mins is not None) == (qtype in ASYMMETRIC)
    np.testing.assert_array_equal(dequantize(embedding), want[qtype + ".table"])


@pytest.mark.parametrize("qtype", QUANTS)
def test_slices_read_only_their_blocks_and_equal_the_whole(typed_file, qtype):
    path, _ = typed_file
    leaf = _quantized_leaf((2, 512, 24), [Piece(_source(path, qtype), (), "matrix")],
                           table=False)
    rng = np.random.default_rng(QUANTS.index(qtype))
    for part in _parts(leaf):
        whole = part.read(None)
        for _ in range(6):  # any box, aligned to the blocks or not
            index = tuple(slice(a, b + 1) for a, b in
                          (sorted(rng.integers(0, n, 2)) for n in part.shape))
            np.testing.assert_array_equal(part.read(index), whole[index])
    if qtype == "Q4_0":  # one group of input rows of one expert: 16 code bytes per column
        before = BYTES_READ.bytes
        leaf.packed.read((slice(1, 2), slice(16, 32)))
        leaf.scales.read((slice(1, 2), slice(1, 2)))
        assert BYTES_READ.bytes - before == 24 * (16 + 2)


@pytest.mark.parametrize("pair", [("Q6_K", "Q4_K"), ("Q8_0", "Q6_K"), ("Q4_0", "Q5_K"),
                                  ("Q5_1", "Q8_0"), ("Q3_K", "Q2_K")])
def test_a_layer_stack_of_mixed_types_is_int8_in_the_finest_group(typed_file, pair):
    """Q4_K_M files keep some layers' attn_v / ffn_down in Q6_K: the stack is int8 in groups
    of 16, exact (Q8_0's scales repeated; an asymmetric type's mins, zero in the others)."""
    path, want = typed_file
    pieces = [Piece(_source(path, qtype + ".table"), (layer,), "matrix")
              for layer, qtype in enumerate(pair)]
    leaf = _quantized_leaf((2, 512, 24), pieces, table=False)
    host = _read(leaf)
    rng = np.random.default_rng(1)
    asymmetric = any(q in ASYMMETRIC for q in pair)
    assert (host.mins is not None) == asymmetric
    for part, whole in zip(_parts(leaf), (host.weight, host.scales, host.mins)[:2 + asymmetric]):
        for _ in range(6):
            index = tuple(slice(a, b + 1) for a, b in
                          (sorted(rng.integers(0, n, 2)) for n in part.shape))
            np.testing.assert_array_equal(part.read(index), whole[index])
    group = 16 if {"Q6_K", "Q3_K", "Q2_K"} & set(pair) else 32
    assert isinstance(host, QuantizedWeight8bit) and host.scales.shape == (2, 512 // group, 24)
    f16 = all(q in ("Q8_0", "Q5_0", "Q4_0", "Q4_1", "Q5_1") for q in pair)
    assert host.scales.dtype == (np.float16 if f16 else np.float32)
    got = dequantize(host)
    for layer, qtype in enumerate(pair):
        np.testing.assert_array_equal(got[layer], want[qtype + ".table"].T)
        if qtype not in ASYMMETRIC and asymmetric:
            assert not np.asarray(host.mins[layer]).any()


@pytest.mark.parametrize("name,qtype", [("llama", "Q4_0"), ("llama", "Q4_1"),
                                        ("mixtral", "Q4_0")])
def test_q4_loads_as_exact_int4_and_matches_the_dequantized_hf_path(tmp_path, name, qtype):
    path = tmp_path / f"{name}.gguf"
    written = write_model_gguf(HF / name, path, qtype)
    config = default_config(path)
    before = BYTES_READ.bytes
    params = load_params(path, config)
    if qtype == "Q4_0":  # each byte of the file's tensors read once (a Q4_1 table: twice)
        assert BYTES_READ.bytes - before == sum(t.n_bytes for t in open_gguf(path).tensors)
    key = params[LAYER + "multi_head_attention/key"]["w"]
    assert isinstance(key, QuantizedWeight4bit) and key.scales.dtype == np.float16
    assert key.scales.shape == (config.num_layers, config.emb_size // 32,
                                config.num_kv_heads * config.key_size)
    assert (key.mins is None) == (qtype == "Q4_0")
    kind = gguf.GGMLQuantizationType[qtype]
    raw = written["blk.1.attn_k.weight"]
    want_key = gguf.quants.dequantize(gguf.quants.quantize(raw, kind), kind)
    want_key = want_key[rope_rows(len(raw), config.num_kv_heads)].T  # HF order, [in, out]
    np.testing.assert_array_equal(dequantize_int4(QuantizedWeight4bit(
        *(None if p is None else np.asarray(p)[1] for p in (key.packed, key.scales, key.mins)))),
        want_key)
    table = params["language_model/in_out_embed"]["embeddings"]
    assert isinstance(table, QuantizedEmbedding)  # exact: Q4_0 as q - 8, Q4_1 with mins
    assert (table.mins is None) == (qtype == "Q4_0")
    reference = tmp_path / "dequantized"
    write_dequantized_hf_copy(HF / name, reference, qtype,
                              {"model.embed_tokens.weight": dequantize(table)})
    hf_config = read_hf_config(reference)
    got = forward(config, params, long_ids(name))
    want = forward(hf_config, load_params(reference, hf_config), long_ids(name))
    error = np.abs(got - want).max() / np.abs(want).max()
    print(f"{name} {qtype} vs HF on dequantized weights: max relative logit error {error:.2e}")
    assert error < 1e-5 and (got.argmax(-1) == want.argmax(-1)).all()


def test_k_quants_load_as_int4_and_int8_and_give_the_float_models_logits(tmp_path, capfd):
    path, floats = kquant_files(tmp_path)
    config = default_config(path)
    capfd.readouterr()
    params = load_params(path, config)
    assert "[gguf]" not in capfd.readouterr().err  # nothing quantised again
    attention = LAYER + "multi_head_attention/"
    query = params[attention + "query"]["w"]
    assert isinstance(query, QuantizedWeight4bit) and query.scales.dtype == np.float32
    assert query.mins.shape == (2, 256 // 32, 256)
    for path_, group in ((attention + "value", 16), (LAYER + "mlp/linear_1", 16),
                         (LAYER + "mlp/linear_v", 32), ("language_model/unembed", 16)):
        leaf = params[path_]["w"]
        assert isinstance(leaf, QuantizedWeight8bit) and leaf.scales.dtype == np.float32
        assert leaf.scales.shape[-2] == 256 // group, path_
    assert isinstance(params["language_model/in_out_embed"]["embeddings"], QuantizedEmbedding)
    ids = np.arange(1, 40)[None] % config.vocab_size
    got = forward(config, params, ids)
    want = forward(config, load_params(floats, config), ids)
    error = np.abs(got - want).max() / np.abs(want).max()
    print(f"K-quants vs float32: max relative logit error {error:.2e}")
    assert error < 1e-5 and (got.argmax(-1) == want.argmax(-1)).all()
    # a type the reader does not load, forged in place of Q4_K: one line, named
    first = _forge_types(path, tmp_path / "iq4.gguf", "Q4_K", "IQ4_XS", count=1)[0]
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'iq4.gguf'}: tensor "
                                              f"{first} has GGML type IQ4_XS, which is not "
                                              f"supported; supported: [^\\n]*$"):
        lazy_gguf(tmp_path / "iq4.gguf", config)


def test_weight_format_follows_the_file(tmp_path, capsys):
    """What the memory plan assumes for a GGUF file: the format of the bulk of its bytes, each
    weight as its type loads (f16 scales per 32 rows here), unless --quantize says otherwise."""
    from runtime import cli
    from runtime.app import print_plan
    from runtime.planning import default_weight_format
    for qtype, fmt in (("F32", "float32"), ("F16", "bfloat16"), ("Q8_0", "int8"),
                       ("Q4_0", "int4"), ("Q4_1", "int4")):
        path = tmp_path / f"{qtype}.gguf"
        write_model_gguf(HF / "llama", path, qtype)
        assert weight_format(path) == fmt, qtype
        assert default_weight_format("gguf", None, path) == fmt, qtype
        assert default_weight_format("gguf", "int8", path) == "int8", qtype
    for qtype, named in (("Q8_0", "int8 "), ("Q4_0", "int4 ")):
        path = tmp_path / f"plan-{qtype}.gguf"
        write_model_gguf(HF / "llama", path, qtype, tokenizer=bpe_vocab_writer(
            TOKENIZERS / "bos_template" / "tokenizer.json", {}, "gpt-2", size=512))
        assert print_plan(cli.parse_args(["--plan", "--checkpoint", str(path)])) == 0
        header = [line for line in capsys.readouterr().out.splitlines()
                  if line.strip().startswith("weights ")][0]
        assert f"weights {named}" in header, header
        assert f"{named[:-1]} + f16 scales per 32" in header, header


@pytest.mark.slow
def test_run_py_greedy_tokens_of_a_q4_0_file_equal_the_dequantized_float_models(tmp_path,
                                                                                capsys):
    from runtime import cli
    from runtime.app import main
    path = tmp_path / "llama.gguf"
    write_model_gguf(HF / "llama", path, "Q4_0", tokenizer=bpe_vocab_writer(
        TOKENIZERS / "bos_template" / "tokenizer.json", {}, "gpt-2", size=512))
    prompts = [tuple(np.load(HF / "llama" / "expected.npz")[f"prompt_{i}"].tolist())
               for i in range(2)]
    argv = ["--checkpoint", path, "--temperature", "0", "--max-new-tokens", 16, "--json"]
    for prompt in prompts:
        argv += ["--prompt-ids", " ".join(map(str, prompt))]
    assert main(cli.parse_args(list(map(str, argv)))) == 0
    got = [json.loads(line)["output_ids"] for line in capsys.readouterr().out.splitlines()]
    reference = tmp_path / "dequantized"
    write_dequantized_hf_copy(HF / "llama", reference, "Q4_0")
    hf_config = read_hf_config(reference)
    engine = build_engine(hf_config, load_params(reference, hf_config), single_device_mesh(),
                          slots=2, cache_length=64)
    want = [list(r.output_ids) for r in engine.generate(
        [Request(p, max_new_tokens=16) for p in prompts])]
    assert got == want and all(len(ids) == 16 for ids in got)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q2_K", "Q6_K", "Q8_0", "Q4_0", "mixed"])
def test_the_plan_counts_a_files_parameters_as_they_load(tmp_path, qtype):
    """The memory plan of a GGUF file counts every parameter as it loads: a K-quant's float32
    scales and mins per 16 or 32 rows, a stack of mixed types as the int8 stack it loads as
    (Q4_K_M's ffn_down: Q6_K's groups of 16 with Q4_K's mins), a table's own type (was:
    --quantize's bf16 / f16 scales, and Q4_K_M-like files 35% under)."""
    from runtime import cli, layout
    from runtime.app_memory import make_plan_for_flags
    from runtime.checkpoint.gguf_reader import weight_format
    if qtype == "mixed":  # Q4_K_M-like: Q4_K, Q6_K, Q5_K, Q8_0, Q2_K, Q3_K
        path = kquant_files(tmp_path)[0]
    else:
        rng = np.random.default_rng(2)
        path = tmp_path / f"{qtype}.gguf"
        write_tensors_gguf(path, {
            name: ((rng.uniform(0.8, 1.2, shape), "F32") if len(shape) == 1 else
                   (random_blocks(qtype, shape, rng), qtype))
            for name, shape in kquant_model_shapes().items()})
    config = default_config(path)
    # more slots than the CPU panels take: the loaded form (test_plan_panel_forms: the panels')
    args = cli.parse_args(["--plan", "--checkpoint", str(path), "--device-memory", "1GB",
                           "--slots", str(layout.PANEL_SLOTS + 1)])
    plan = make_plan_for_flags(args, config, path, weight_format(path), "gguf", path)
    planned = {leaf.path: leaf.logical_bytes for leaf in plan.leaves}
    loaded = {f"{module}/{name}": sum(part.nbytes for part in jax.tree.leaves(leaf))
              for module, leaves in load_params(path, config).items()
              for name, leaf in leaves.items()}
    assert planned == loaded, qtype
