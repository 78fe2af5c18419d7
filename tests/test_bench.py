"""scripts/bench.py: one small smoke run on the tiny-test preset, and the analytic byte counts
it reports, checked against sums written out here from the config fields."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from runtime.benchmark import expected_distinct_experts, weight_bytes_per_step
from runtime.parameter_shapes import abstract_params
from runtime.planning import abstract_weights
from runtime.quant import quantize, quantize_on_device
from runtime.products import per_tile_linear, switched_tile_linear

BATCH, PROMPT, STEPS = 2, 8, 2


def analytic_bytes(c, batch: int, cache_length: int) -> float:
    """Bytes one float32 decode step of tiny-test reads, from the config fields alone."""
    assert c.dtype == "float32" and c.sandwich_norms and c.tie_embeddings and c.num_experts
    d, h, f, e, k = c.emb_size, c.key_size, c.ffn_size, c.num_experts, c.num_selected_experts
    attention = d * c.num_q_heads * h * 2 + d * c.num_kv_heads * h * 2  # q, o; k, v
    norms, router = 4 * d, d * e  # sandwich: rms_norm, _1, _2, _3
    experts = 3 * d * f * e * (1 - (1 - k / e) ** batch)  # distinct routed experts
    layers = c.num_layers * (attention + norms + router + experts)
    head = c.vocab_size * d + batch * d  # tied table for the logits, plus the gathered rows
    kv = 2 * c.num_layers * batch * cache_length * c.num_kv_heads * h
    return 4.0 * (layers + head + d + kv)  # + final norm; float32 everywhere


def analytic_decode_flops(c, batch: int, read_length: int) -> float:
    """FLOPs of one decode step of tiny-test: every row multiplies the attention, router and
    its k experts' weights and the head, and attends over read_length positions."""
    d, h, f, k = c.emb_size, c.key_size, c.ffn_size, c.num_selected_experts
    per_token = c.num_layers * (d * c.num_q_heads * h * 2 + d * c.num_kv_heads * h * 2
                                + d * c.num_experts + 3 * d * f * k)
    attention = 2 * 2 * c.num_q_heads * h * c.num_layers * read_length  # QK and PV
    return batch * (2.0 * per_token + 2.0 * d * c.vocab_size + attention)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--config", "tiny-test",
         "--batch", str(BATCH), "--prompt-len", str(PROMPT), "--decode-steps", str(STEPS),
         "--repeats", "1", "--weights", "float32", "--bandwidth-mib", "256", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                          "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


@pytest.mark.slow
def test_smoke_run_reports_sane_numbers(smoke):
    results, stdout = smoke
    assert "decode tok/s" in stdout and "MBU" in stdout  # the readable table
    assert results["peaks"]["bandwidth_bytes_per_s"] > 1e8
    assert results["peaks"]["matmul_flops_per_s"]["float32"] > 1e8
    assert results["peaks"]["matvec_bytes_per_s"] > 1e8
    (run,) = results["engine"]
    (row,) = run["rows"]
    assert (row["batch"], row["prompt_len"], row["decode_steps"]) == (BATCH, PROMPT, STEPS)
    assert row["cache_length"] == PROMPT + STEPS + 1
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_s_per_seq",
                "ttft_s", "prefill_flops", "mfu"):
        assert row[key] > 0, key
    assert row["decode_tokens_per_s"] == pytest.approx(BATCH * row["decode_tokens_per_s_per_seq"])
    assert row["kv_read_length"] == row["cache_length"]  # too short for a window
    want = analytic_bytes(tiny_config(), BATCH, row["cache_length"])
    assert row["bytes_per_step"]["total"] == pytest.approx(want, rel=1e-9)
    want = analytic_decode_flops(tiny_config(), BATCH, row["kv_read_length"])
    assert row["decode_flops"] == pytest.approx(want, rel=1e-9)
    assert 0 < row["mbu"] < 1.5
    assert run["peak_memory_bytes"] > 0


def test_decode_bytes_count_only_routed_experts():
    config = tiny_config(num_experts=8, num_selected_experts=2)
    for fmt in ("float32", "int8"):  # int8: values and their scales
        params = abstract_weights(config, fmt)
        every = sum(x.size * x.dtype.itemsize for module, leaves in params.items()
                    if "/moe/" in module for leaf in leaves.values()
                    for x in jax.tree.leaves(leaf))
        assert weight_bytes_per_step(config, params, 1)["experts"] == pytest.approx(every * 2 / 8)
        # a batch hits more distinct experts, never more than all of them
        eight = weight_bytes_per_step(config, params, 8)["experts"]
        assert eight == pytest.approx(every * (1 - (6 / 8) ** 8)) and eight < every
    assert expected_distinct_experts(8, 2, 1) == pytest.approx(2)
    assert expected_distinct_experts(8, 2, 10_000) == pytest.approx(8)
    dense = weight_bytes_per_step(tiny_config(num_experts=0, num_selected_experts=0),
                                  abstract_params(tiny_config(num_experts=0,
                                                              num_selected_experts=0)), 1)
    assert dense["experts"] == 0 and dense["ffn"] > 0


@pytest.mark.parametrize("scale_dtype", [jnp.bfloat16, jnp.float32])
def test_quantize_on_device_is_within_a_step_of_quantize(scale_dtype):
    """Jitted (XLA multiplies by the reciprocal of a constant or broadcast divisor: some
    quotients a rounding apart): values and scales within one step of quantize's."""
    w = np.random.default_rng(0).normal(size=(3, 512, 96)).astype(np.float32)
    w[1, :, 5] = 0  # a zero column: scale 0, values 0
    for rows in (1, 8, 32):
        host = quantize(w, rows, scale_dtype)
        fast = jax.jit(lambda a: quantize_on_device(a, rows, scale_dtype))(w)
        assert np.abs(host.weight.astype(int) - np.asarray(fast.weight)).max() <= 1
        step = 2.0 ** -7 if scale_dtype == jnp.bfloat16 else 2.0 ** -23  # one rounding step
        np.testing.assert_allclose(np.asarray(fast.scales, np.float32),
                                   np.asarray(host.scales, np.float32), rtol=step)


@pytest.mark.parametrize("int8", [False, True])
def test_switched_tile_linear_equals_the_gathered_product(int8):
    rng = np.random.default_rng(1)
    stacked = rng.normal(size=(4, 16, 8)).astype(np.float32)  # E=4 experts [I, O]
    weights = quantize(stacked, 2) if int8 else stacked
    x = rng.normal(size=(5, 3, 16)).astype(np.float32)  # 5 tiles of 3 rows
    tile_expert = np.array([2, 0, 3, 3, 1], np.int32)
    each = [jax.tree.map(lambda a, e=e: a[e], weights) for e in range(4)]
    got = jax.jit(switched_tile_linear)(x, each, tile_expert)
    want = per_tile_linear(x, jax.tree.map(lambda a: a[tile_expert], weights))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_hf_rows_show_the_ratio_the_machine_limits_allow():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_report

    row = {"batch": 16, "prompt_len": 128, "bytes_per_step": {"total": 1e9},
           "decode_step_s": 0.2, "prefill_s": 2.0, "prefill_flops": 4e11, "decode_flops": 6e9,
           "prefill_tokens_per_s": 1024.0, "decode_tokens_per_s": 80.0}
    hf = {"batch": 16, "prompt_len": 128, "prefill_s": 3.0, "decode_step_s": 0.25,
          "prefill_tokens_per_s": 2048 / 3.0, "decode_tokens_per_s": 64.0}
    results = {"machine": {"backend": "cpu"},
               "peaks": {"bandwidth_bytes_per_s": 20e9, "matmul_flops_per_s": {"float32": 1e11}},
               "engine": [{"label": "llama", "weights": "float32", "dtype": "float32",
                           "rows": [row]}],
               "peers": [{"family": "llama", "prompt_len": 128, "runtime_index": 0,
                          "hf": {"rows": [hf], "matmul_flops_per_s": 2e11}}]}
    bench_report.derive(results)
    rows = {r["phase"]: r for r in results["peer_rows"]}
    # prefill: HF's 3 s over 4e11 FLOPs at the faster library's 2e11 FLOP/s (2 s)
    assert rows["prefill"]["ceiling"] == pytest.approx(1.5)
    # another peer process of the run measured torch faster: the machine's rate for all rows
    results["peers"].append({"family": "other", "prompt_len": 128, "runtime_index": 0,
                             "hf": {"rows": [hf], "matmul_flops_per_s": 3e11}})
    bench_report.derive(results)
    again = {r["phase"]: r for r in results["peer_rows"] if r["family"] == "llama"}
    assert again["prefill"]["ceiling"] == pytest.approx(3.0 * 3e11 / 4e11)
    assert rows["prefill"]["ratio"] == pytest.approx(1.5)
    # decode: FLOPs bound (6e9 / 2e11 = 30 ms) above the bytes bound (1e9 / 20e9 = 50 ms)? No:
    # the longer of the two floors (50 ms) counts
    assert rows["decode"]["ceiling"] == pytest.approx(0.25 / 0.05)
    assert rows["decode"]["ratio"] == pytest.approx(80 / 64)


def test_peer_rounds_keep_each_phase_of_its_fastest_round():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    def row(batch, prefill_s, step_s):
        return {"batch": batch, "prompt_len": 128, "prefill_s": prefill_s,
                "prefill_tokens_per_s": batch * 128 / prefill_s, "ttft_s": prefill_s,
                "decode_step_s": step_s, "decode_tokens_per_s": batch / step_s,
                "bytes_per_step": {"total": 1e9}}

    first = [row(1, 0.30, 0.040), row(16, 3.0, 0.100)]
    second = [row(1, 0.25, 0.050), row(16, 3.5, 0.090)]  # a slow spell on batch 1's decode
    one, sixteen = bench.best_of_rounds([first, second])
    assert (one["prefill_s"], one["ttft_s"], one["decode_step_s"]) == (0.25, 0.25, 0.040)
    assert one["prefill_tokens_per_s"] == pytest.approx(128 / 0.25)
    assert one["decode_tokens_per_s"] == pytest.approx(1 / 0.040)
    assert (sixteen["prefill_s"], sixteen["decode_step_s"]) == (3.0, 0.090)
    assert sixteen["round_times"] == [{"prefill_s": 3.0, "decode_step_s": 0.100},
                                      {"prefill_s": 3.5, "decode_step_s": 0.090}]
    assert bench.best_of_rounds([first]) == [{**r, "round_times": [
        {"prefill_s": r["prefill_s"], "decode_step_s": r["decode_step_s"]}]} for r in first]


@pytest.mark.slow
def test_product_formulations_bench_checks_and_times_every_form(tmp_path):
    """scripts/bench_products.py: every formulation of a few-row product, for both weight
    formats, agrees with float64 and gets a time."""
    out = tmp_path / "products.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_products.py"), "--shapes", "64x48",
         "--rows", "1,3", "--repeats", "1", "--cache-mib", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    seen = {(r["weights"], r["rows"], r["form"]) for r in rows}
    assert seen == {(w, m, f) for w in ("bfloat16", "int8") for m in (1, 3)
                    for f in ("dot", "dot_t", "reduce", "reduce_t")}
    for row in rows:
        assert row["rel_error"] < 1e-2 and row["us"] > 0, row


@pytest.mark.slow
def test_panel_rows_bench_checks_the_kernel_against_xla_and_times_both():
    """scripts/bench_panel_rows.py --xla: every kind, a few rows and many, each checked against
    XLA's product of the same weight before it is timed."""
    from runtime import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("no C++ compiler")
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_panel_rows.py"), "--shape", "64,128",
         "--rows", "2,9", "--xla"], capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split(" M=")[0].split()[0] for line in lines] == ["f32"] * 2 + ["int8"] * 2 \
        + ["int4"] * 2
    assert all("kernel" in line and "XLA" in line for line in lines), lines


@pytest.mark.parametrize("content", [None, "{\"engine\": [", "{\"peaks\": {}}"])
def test_report_of_a_bad_results_file_is_a_one_line_error(tmp_path, content):
    """--report on a missing, truncated or foreign file names the file; no traceback."""
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--report",
                           str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in done.stderr


def test_rounds_below_one_are_refused_by_name(capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    with pytest.raises(SystemExit):
        bench.parse_args(["--suite", "cpu", "--rounds", "0"])
    assert "--rounds 0: must be at least 1" in capsys.readouterr().err
    assert bench.parse_args(["--suite", "cpu", "--rounds", "2"]).rounds == 2


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0"])
def test_random_gguf_for_the_llamacpp_peer_loads_as_its_type(tmp_path, qtype):
    """scripts/bench_llamacpp.py's GGUF of random weights (no llama.cpp needed): the runtime
    reads the shape back from its metadata, the matrices in the type asked for (norms F32)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import gguf
    import bench_llamacpp
    from runtime.checkpoint.gguf_reader import weight_format
    from runtime.checkpoint.load import default_config
    hf = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    path = tmp_path / f"m-{qtype}.gguf"
    written = bench_llamacpp.write_random_gguf(path, hf, qtype)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types == written and "output.weight" not in types  # tied: llama.cpp reuses the table
    assert types["blk.1.ffn_down.weight"] == qtype and types["blk.0.attn_norm.weight"] == "F32"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == hf["vocab_size"]
    config = default_config(path)
    assert (config.vocab_size, config.emb_size, config.num_layers, config.num_q_heads,
            config.num_kv_heads, config.ffn_size) == (300, 64, 2, 4, 2, 128)
    assert config.tie_embeddings
    assert weight_format(path) == {"F32": "float32", "F16": "bfloat16", "BF16": "bfloat16",
                                  "Q8_0": "int8",
                                  "Q4_0": "int4"}[qtype]


def test_random_moe_gguf_for_the_llamacpp_peer_loads_as_mixtral(tmp_path):
    """A Mixtral shape's random GGUF: experts stacked [E, out, in] in the type asked for, the
    router F32, and the runtime reads back its experts and their routing from the metadata."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import gguf
    import bench_llamacpp
    from runtime.checkpoint.load import default_config
    hf = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, num_local_experts=4, num_experts_per_tok=2,
              tie_word_embeddings=False)
    path = tmp_path / "moe-Q8_0.gguf"
    written = bench_llamacpp.write_random_gguf(path, hf, "Q8_0")
    assert written["blk.1.ffn_down_exps.weight"] == "Q8_0"
    assert written["blk.0.ffn_gate_inp.weight"] == "F32" and "blk.0.ffn_gate.weight" not in written
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in gguf.GGUFReader(str(path)).tensors}
    assert shapes["blk.0.ffn_up_exps.weight"] == (64, 96, 4)  # GGUF lists dimensions reversed
    config = default_config(path)
    assert (config.num_experts, config.num_selected_experts, config.ffn_size) == (4, 2, 96)
    assert not config.tie_embeddings


def test_trace_ops_counts_tokens_host_time_and_operations(tmp_path):
    """scripts/trace_ops.py on a synthetic trace: tokens from the dispatch calls (a block call
    counts its steps), host time less the waits inside the dispatch, operations per token."""
    import gzip

    sys.path.insert(0, str(ROOT / "scripts"))
    import trace_ops

    def event(name, ts, dur, tid=1):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}

    events = [event("$engine.py:378 decode_block", 0, 1000),
              event("$numpy asarray", 200, 700),  # the wait inside: not host time
              event("$engine.py:378 decode_block", 2000, 500),
              event("$numpy asarray", 5000, 300),  # outside any dispatch: not subtracted
              event("ffi_call.3", 100, 80, tid=2), event("ffi_call.3", 2100, 80, tid=2),
              event("fusion.1", 150, 40, tid=2)]
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    (folder / "perfetto_trace.json.gz").write_bytes(
        gzip.compress(json.dumps({"traceEvents": events}).encode()))
    result = trace_ops.summary(trace_ops.load_events(tmp_path), block=4)
    assert result["tokens"] == 8
    assert result["host_us_per_token"] == (1000 - 700 + 500) / 8
    assert result["ops"][0] == ("ffi_call.3", 160 / 8, 2 / 8)
    assert ("fusion.1", 40 / 8, 1 / 8) in result["ops"]
    # k as bench_runtime.py writes it beside a trace (BENCH_PROFILE_DIR/trace-.../), else 1
    trace = trace_ops.newest_trace(tmp_path)
    assert trace_ops.steps_per_dispatch(trace, tmp_path) == 1
    (tmp_path / "plugins" / trace_ops.STEPS_FILE).write_text("4\n")
    assert trace_ops.steps_per_dispatch(trace, tmp_path) == 4


def test_llamacpp_table_quotes_our_best_against_llama_bench_tg():
    """The binding's per-token time runs slower than llama-bench's tg on the same file; the
    table gives ours / llama-bench tg beside ours / binding, "-" where llama-bench did not run."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    def entry(qtype, index, bench_runs):
        runs = [{"rows": [{"decode_step_s": s}], **({"llama_bench": b} if b else {})}
                for s, b in bench_runs]
        return {"gguf_type": qtype, "file_bytes": 144e6, "runtime_index": index, "runs": runs}
    ours = {"weights": "int8", "rows": [{"round_times": [{"decode_step_s": 0.006},
                                                         {"decode_step_s": 0.005}]}]}
    results = {"engine": [ours, ours], "llamacpp": [
        entry("Q8_0", 0, [(0.0070, {"tg": 150.0, "pp": 700}), (0.0066, {"tg": 172.5, "pp": 786})]),
        entry("F32", 1, [(0.0070, None)])]}
    rows = [line.strip("|").split("|") for line in bench.llamacpp_table(results).splitlines()[2:]]
    assert rows[0][-1].strip() == f"{200 / 172.5:.2f}" and "172.5 (786)" in rows[0][-2]
    assert rows[0][-3].strip() == f"{0.0055 / 0.0068:.2f}"  # medians: ours / binding
    assert rows[1][-1].strip() == "-" and rows[1][-2].strip() == "not run"
