"""Sampling: greedy exactness, top-k / top-p masks, empirical distributions, per-row keys.

Only two shapes are compiled: SMALL (16 rows x 1024 tokens) for sample and filter_logits, and
STATS (4 groups x 4000 rows x 8 tokens) for sample.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runtime import cpu_kernels
from runtime.sampling import filter_logits, greedy_tokens, row_keys, sample

_sample = jax.jit(sample)
_filter = jax.jit(filter_logits)
_keys = jax.jit(row_keys)

B, V = 16, 1024  # the SMALL shape


def settings(n, temperature=1.0, top_k=0, top_p=1.0):
    return (np.full(n, temperature, np.float32), np.full(n, top_k, np.int32),
            np.full(n, top_p, np.float32))


def keys_for(seeds, steps):
    return _keys(jnp.asarray(seeds, jnp.int32), jnp.asarray(steps, jnp.int32))


def run_sample(logits, seeds, steps, temperature, top_k, top_p):
    out = _sample(jnp.asarray(logits, jnp.float32), keys_for(seeds, steps),
                  jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
                  jnp.asarray(top_p, jnp.float32))
    assert out.dtype == jnp.int32 and out.shape == (len(logits),)
    return np.asarray(out)


def kept_mask(logits, temperature, top_k, top_p):
    out = _filter(jnp.asarray(logits, jnp.float32), jnp.asarray(temperature, jnp.float32),
                  jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32))
    return np.isfinite(np.asarray(out))


def near_tie_logits(rng):
    """SMALL logits where, in each row, two tokens differ by ~1e-6 at the top (bf16 merges them).

    The larger one sits at the higher index, so an argmax over merged values would pick the wrong
    (first) one.
    """
    logits = rng.normal(size=(B, V)).astype(np.float32)
    logits = np.minimum(logits, 2.0)
    for r in range(B):
        lo, hi = sorted(rng.choice(V, size=2, replace=False))
        logits[r, lo] = np.float32(3.0)
        logits[r, hi] = np.float32(3.0) + np.float32(1e-6)
        assert 0 < logits[r, hi] - logits[r, lo] < 1.1e-6
        assert jnp.asarray(logits[r, lo], jnp.bfloat16) == jnp.asarray(logits[r, hi], jnp.bfloat16)
    return logits


def test_greedy_is_exact_float32_argmax_on_near_ties():
    rng = np.random.default_rng(0)
    logits = near_tie_logits(rng)
    expected = np.argmax(logits, axis=-1)
    # greedy rows ignore their top_k / top_p settings and their key
    t, k, p = settings(B, temperature=0.0, top_k=5, top_p=0.3)
    out = run_sample(logits, np.arange(B), np.zeros(B), t, k, p)
    np.testing.assert_array_equal(out, expected)
    out2 = run_sample(logits, np.arange(B) + 100, np.arange(B) + 7, t, k, p)
    np.testing.assert_array_equal(out2, expected)


@pytest.mark.parametrize("in_kernel", [False, True])
def test_greedy_tokens_are_numpys_argmax_with_ties_nans_and_infinities(in_kernel, monkeypatch):
    """The two-reduction argmax and the CPU kernel: the first of tied maxima, the first NaN of a
    row with NaNs (numpy's and jnp.argmax's rule), index 0 for a row of -inf."""
    monkeypatch.setattr(cpu_kernels, "greedy_usable", lambda: in_kernel)
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(B, V)).astype(np.float32)
    logits[1, [40, 7, 900]] = 9.0  # ties: the first wins
    logits[2, [500, 30]] = np.nan
    logits[3, 11] = np.nan
    logits[3, 12] = np.inf
    logits[4] = -np.inf
    logits[5, [3, 1000]] = np.inf
    logits[6, -1] = 50.0  # the last token
    got = np.asarray(jax.jit(greedy_tokens)(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
    assert list(got[1:7]) == [7, 30, 11, 0, 3, V - 1]


@pytest.mark.parametrize("rows,vocab", [(1, 7), (3, 8), (2, 32003), (9, 49152)])
def test_greedy_kernel_is_numpys_argmax_past_its_vector_width_and_threads(rows, vocab):
    """Widths around its 8 lanes, and rows enough to split across threads; a NaN after a larger
    maximum (the XLA path's exception) and a maximum in the tail past the last full vector."""
    if not cpu_kernels.available():
        pytest.skip("no C++ compiler for the CPU kernels")
    rng = np.random.default_rng(rows * vocab)
    logits = rng.normal(size=(rows, vocab)).astype(np.float32)
    logits[0, -1] = 20.0  # the tail
    if rows > 1:
        logits[1, [0, vocab - 1]] = [30.0, np.nan]  # a NaN after the maximum
    if rows > 2:
        logits[-1, vocab // 2:] = -np.inf
        logits[-1, : vocab // 2] = np.nan if vocab > 8 else -np.inf
    got = np.asarray(jax.jit(cpu_kernels.greedy_tokens)(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))


def test_greedy_kernel_on_rows_of_few_values_ties_everywhere():
    """Ties across and within its lanes, infinities and NaNs anywhere, widths 1-40."""
    if not cpu_kernels.available():
        pytest.skip("no C++ compiler for the CPU kernels")
    rng = np.random.default_rng(11)
    values = np.array([-np.inf, 0.0, 1.0, 2.0, np.inf, np.nan], np.float32)
    for vocab in range(1, 41):
        logits = rng.choice(values, size=(6, vocab), p=[.2, .2, .2, .25, .1, .05])
        got = np.asarray(jax.jit(cpu_kernels.greedy_tokens)(jnp.asarray(logits)))
        np.testing.assert_array_equal(got, np.argmax(logits, axis=-1), err_msg=f"V {vocab}")


@pytest.mark.parametrize("temperature", [0.7, 1.0, 3.0])
def test_top_k_1_is_argmax(temperature):
    rng = np.random.default_rng(1)
    logits = near_tie_logits(rng)
    t, k, p = settings(B, temperature=temperature, top_k=1)
    for step in range(3):
        out = run_sample(logits, np.arange(B), np.full(B, step), t, k, p)
        np.testing.assert_array_equal(out, np.argmax(logits, axis=-1))


def test_tiny_top_p_is_argmax():
    rng = np.random.default_rng(2)
    logits = near_tie_logits(rng)
    t, k, p = settings(B, temperature=1.0, top_p=1e-6)
    for step in range(3):
        out = run_sample(logits, np.arange(B) + 3, np.full(B, step), t, k, p)
        np.testing.assert_array_equal(out, np.argmax(logits, axis=-1))


def test_filter_masks_on_handcrafted_distribution():
    probs = np.array([0.15, 0.5, 0.05, 0.3])  # order scrambled: ranks are 1, 3, 0, 2
    logits = np.tile(np.log(probs).astype(np.float32), (8, 1))
    rows = [  # (temperature, top_k, top_p, expected kept token ids)
        (1.0, 0, 0.7, {1, 3}),
        (1.0, 0, 0.85, {0, 1, 3}),
        (1.0, 0, 0.4, {1}),  # the top token crosses the threshold alone
        (1.0, 2, 1.0, {1, 3}),
        (1.0, 3, 1.0, {0, 1, 3}),
        (1.0, 0, 1.0, {0, 1, 2, 3}),  # both filters off
        (1.0, 4, 0.99, {0, 1, 2, 3}),  # 0.95 of mass is before the last token: kept
        (2.0, 0, 0.7, {1, 3, 0}),  # flatter at T=2: sorted p ~ 0.38, 0.29, 0.21, 0.12
    ]
    # independent check of the last row's expectation
    flat = np.sqrt(probs) / np.sqrt(probs).sum()
    order = np.argsort(-flat)
    before = np.cumsum(flat[order]) - flat[order]
    assert set(order[before < 0.7].tolist()) == rows[-1][3]

    # in the SMALL shape: the 8 rows twice, the other 1020 tokens at -inf (zero probability)
    padded = np.full((B, V), -np.inf, np.float32)
    padded[:, :4] = np.tile(logits, (2, 1))
    t = np.tile([r[0] for r in rows], 2).astype(np.float32)
    k = np.tile([r[1] for r in rows], 2).astype(np.int32)
    p = np.tile([r[2] for r in rows], 2).astype(np.float32)
    mask = kept_mask(padded, t, k, p)
    for i in range(B):
        assert set(np.flatnonzero(mask[i]).tolist()) == rows[i % 8][3], (i, rows[i % 8])
    # kept values are the logits divided by the temperature
    out = np.asarray(_filter(jnp.asarray(padded), jnp.asarray(t), jnp.asarray(k), jnp.asarray(p)))
    np.testing.assert_allclose(out[mask], (padded / t[:, None])[mask], rtol=1e-6)


def test_top_p_one_keeps_every_token():
    """top_p = 1 is 'off': float32 rounding of the cumulative mass must not drop the tail."""
    logits = np.zeros((B, V), np.float32)
    logits[:, 0] = 30.0  # p0 rounds to 1.0 in float32, so the mass 'before' every other token is 1
    logits[1:] = np.random.default_rng(3).normal(size=(B - 1, V)) * 5.0
    t, k, p = settings(B, temperature=1.0)
    assert kept_mask(logits, t, k, p).all()


STATS_LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -2.0], np.float32)
N = 4000
GROUPS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),
    (0.5, 0, 1.0),
    (1.0, 3, 1.0),
    (1.3, 0, 0.6),
]


def expected_distribution(temperature, top_k, top_p):
    """Independent float64 reference: softmax(logits / T), restricted and renormalised."""
    z = STATS_LOGITS.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros(len(p), bool)
    if top_k:
        keep[order[:top_k]] = True
    else:
        keep[:] = True
    if top_p < 1:
        before = np.cumsum(p[order]) - p[order]
        # the test's thresholds are far from any cumulative boundary
        assert np.min(np.abs(before - top_p)) > 0.02
        nucleus = np.zeros(len(p), bool)
        nucleus[order[before < top_p]] = True
        keep &= nucleus
    q = np.where(keep, p, 0.0)
    return q / q.sum(), keep


@pytest.fixture(scope="module")
def stats_samples():
    rows = len(GROUPS) * N
    logits = np.tile(STATS_LOGITS, (rows, 1))
    t = np.repeat([g[0] for g in GROUPS], N).astype(np.float32)
    k = np.repeat([g[1] for g in GROUPS], N).astype(np.int32)
    p = np.repeat([g[2] for g in GROUPS], N).astype(np.float32)
    # distinct (seed, step) per row: 1000 seeds x 16 steps
    seeds = np.arange(rows) // 16 + 12345
    steps = np.arange(rows) % 16
    return run_sample(logits, seeds, steps, t, k, p).reshape(len(GROUPS), N)


@pytest.mark.parametrize("group", range(len(GROUPS)))
def test_empirical_frequencies_match(stats_samples, group):
    expected, keep = expected_distribution(*GROUPS[group])
    samples = stats_samples[group]
    assert samples.min() >= 0 and samples.max() < len(STATS_LOGITS)
    # filtered tokens never appear
    assert keep[samples].all(), sorted(set(samples[~keep[samples]].tolist()))
    freq = np.bincount(samples, minlength=len(STATS_LOGITS)) / N
    # 4 sigma of the largest binomial standard deviation sqrt(0.25 / N) ~= 0.0079
    np.testing.assert_allclose(freq, expected, atol=0.032)
    # and a chi-square check over the kept tokens (df <= 7; 99.99th percentile of chi2(7) ~= 29.9)
    chi2 = np.sum((freq[keep] - expected[keep]) ** 2 / expected[keep]) * N
    assert chi2 < 30.0, chi2


def test_temperature_groups_really_differ(stats_samples):
    """Guards the frequency test: the reference distributions of the groups are far apart."""
    d0, _ = expected_distribution(*GROUPS[0])
    d1, _ = expected_distribution(*GROUPS[1])
    assert np.max(np.abs(d0 - d1)) > 0.1
    f0 = np.bincount(stats_samples[0], minlength=8) / N
    f1 = np.bincount(stats_samples[1], minlength=8) / N
    assert np.max(np.abs(f0 - f1)) > 0.1


def mixed_batch(rng):
    logits = (rng.normal(size=(B, V)) * 0.5).astype(np.float32)
    t = rng.uniform(0.5, 2.0, size=B).astype(np.float32)
    t[[0, 5]] = 0.0  # greedy rows
    k = np.where(np.arange(B) % 3 == 1, 50, 0).astype(np.int32)
    p = np.where(np.arange(B) % 4 == 2, 0.9, 1.0).astype(np.float32)
    seeds = rng.integers(0, 2**31 - 1, size=B)
    steps = rng.integers(0, 1000, size=B)
    return logits, seeds, steps, t, k, p


def test_same_seed_and_step_give_same_sample():
    args = mixed_batch(np.random.default_rng(4))
    a = run_sample(*args)
    b = run_sample(*args)
    np.testing.assert_array_equal(a, b)
    # two rows with equal logits, settings and (seed, step) agree, even in one batch
    logits, seeds, steps, t, k, p = (np.array(x) for x in args)
    for src, dst in [(1, 9), (3, 14)]:
        logits[dst], seeds[dst], steps[dst] = logits[src], seeds[src], steps[src]
        t[dst], k[dst], p[dst] = t[src], k[src], p[src]
    c = run_sample(logits, seeds, steps, t, k, p)
    assert c[9] == c[1] and c[14] == c[3]


def test_sample_independent_of_row_position_and_other_rows():
    rng = np.random.default_rng(5)
    logits, seeds, steps, t, k, p = mixed_batch(rng)
    base = run_sample(logits, seeds, steps, t, k, p)
    perm = rng.permutation(B)
    assert (perm != np.arange(B)).sum() > B // 2
    permuted = run_sample(logits[perm], seeds[perm], steps[perm], t[perm], k[perm], p[perm])
    np.testing.assert_array_equal(permuted, base[perm])
    # change every other row (logits, keys, settings): the first half is unchanged
    other = mixed_batch(np.random.default_rng(6))
    half = B // 2
    mixed = [np.concatenate([a[:half], o[half:]]) for a, o in
             zip((logits, seeds, steps, t, k, p), other)]
    np.testing.assert_array_equal(run_sample(*mixed)[:half], base[:half])


def test_different_seeds_or_steps_give_different_samples():
    logits = np.zeros((B, V), np.float32)  # flat over 1024 tokens
    t, k, p = settings(B, temperature=1.0)
    by_seed = run_sample(logits, np.arange(B) + 1, np.zeros(B), t, k, p)
    by_step = run_sample(logits, np.full(B, 77), np.arange(B), t, k, p)
    # 16 uniform draws from 1024 tokens: P(fewer than 12 distinct) is negligible
    assert len(set(by_seed.tolist())) >= 12
    assert len(set(by_step.tolist())) >= 12
    assert (by_seed != by_step).sum() >= 12
    # flat distribution: every token kept, draws spread over the vocabulary
    assert by_seed.max() - by_seed.min() > V // 4


def test_row_keys_distinct_and_repeatable():
    seeds = np.array([0, 0, 1, 1, 7, 7, 2**31 - 1, 0, 3, 3, 4, 4, 5, 5, 6, 6])
    steps = np.array([0, 1, 0, 1, 5, 5, 0, 0, 9, 8, 1, 0, 2, 3, 4, 4])
    keys = np.asarray(keys_for(seeds, steps))
    assert keys.shape == (B, 2)
    pairs = list(zip(seeds.tolist(), steps.tolist()))
    for i in range(B):
        for j in range(B):
            assert (keys[i] == keys[j]).all() == (pairs[i] == pairs[j]), (pairs[i], pairs[j])


def test_mixed_greedy_and_sampled_rows_in_one_call():
    rng = np.random.default_rng(7)
    logits = near_tie_logits(rng)
    logits[1::2] = 0.0  # sampled rows: flat
    t = np.where(np.arange(B) % 2 == 0, 0.0, 1.0).astype(np.float32)
    k = np.zeros(B, np.int32)
    p = np.ones(B, np.float32)
    draws = [run_sample(logits, np.arange(B) + 1000 * s, np.zeros(B), t, k, p) for s in range(3)]
    for out in draws:
        np.testing.assert_array_equal(out[0::2], np.argmax(logits[0::2], axis=-1))
    sampled = np.stack([d[1::2] for d in draws])  # [3 draws, 8 rows]
    # the sampled rows do draw, and differ between seeds
    assert len(set(sampled.ravel().tolist())) >= 16
    assert (sampled[0] != sampled[1]).sum() >= 6


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [[0.0, 0.0, 0.0], [0.0, 0.8, 0.0], [1.0, 0.5, 2.0]])
def test_gpu_sampling_has_no_conditional_and_samples_the_same(monkeypatch, temperature):
    """On GPUs sample() always sorts (XLA:GPU waits on the host for a conditional's
    predicate); the tokens equal the branching version's, all-greedy batches included."""
    logits = jnp.asarray(np.random.default_rng(5).normal(size=(3, 50)) * 3, jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_k, top_p = jnp.array([0, 5, 0], jnp.int32), jnp.array([1.0, 1.0, 0.7], jnp.float32)
    keys = keys_for([1, 2, 3], [4, 5, 6])

    def tokens_and_jaxpr():
        fn = lambda: sample(logits, keys, temperature, top_k, top_p)  # noqa: E731
        return np.asarray(fn()), str(jax.make_jaxpr(fn)())

    branching, branching_jaxpr = tokens_and_jaxpr()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    straight, straight_jaxpr = tokens_and_jaxpr()
    assert "cond" in branching_jaxpr and "cond" not in straight_jaxpr
    np.testing.assert_array_equal(straight, branching)
