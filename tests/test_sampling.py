"""Device-side sampling: greedy, temperature, top-k, top-p, seeded reproducibility."""
import math

import pytest
import torch

from fastlm.sampling import check_sampling_args, filter_logits, sample, sample_with_max


def test_greedy_and_zero_temperature_are_argmax():
    logits = torch.randn(5, 37)
    assert torch.equal(sample(logits, greedy=True), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(greedy=True), dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_row_max_flags_exactly_the_nan_rows(dtype, kw):
    """sample_with_max's second output (what generate checks) is each row's maximum, NaN
    exactly for the rows holding a NaN; its tokens are sample's."""
    logits = torch.randn(6, 50).to(dtype)
    logits[1, 7] = float("nan")
    logits[4] = float("nan")
    logits[5, 3] = float("inf")
    tok, top = sample_with_max(logits, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.isnan(top).tolist() == [False, True, False, False, True, False]
    ok = torch.tensor([0, 2, 3, 5])
    assert torch.equal(top[ok].float(), logits[ok].float().amax(-1))
    assert torch.equal(tok, sample(logits, generator=torch.Generator().manual_seed(3), **kw))
    if kw.get("greedy"):
        assert torch.equal(tok[ok], logits[ok].argmax(-1))


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(4, 100)
    a = sample(logits, temperature=0.8, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = sample(logits, temperature=0.8, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_sampling_follows_the_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(40000, 4)
    g = torch.Generator().manual_seed(1)
    ids = sample(logits, temperature=1.0, generator=g)
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.01, rtol=0)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).expand(5000, 5)
    g = torch.Generator().manual_seed(2)
    ids = sample(logits, top_k=2, generator=g)
    assert set(ids.unique().tolist()) == {0, 1}
    p = torch.softmax(logits[0], -1)  # ~[0.64, 0.24, 0.09, ...]
    ids = sample(logits, top_p=0.8, generator=g)  # 0.64 < 0.8 -> keep two tokens
    assert set(ids.unique().tolist()) == {0, 1}
    ids = sample(logits, top_p=float(p[0]) - 1e-3, generator=g)  # only the top token
    assert set(ids.unique().tolist()) == {0}
    f = filter_logits(torch.tensor([[1.0, 5.0, 3.0]]), top_k=1)
    assert torch.isinf(f[0, [0, 2]]).all() and f[0, 1] == 5.0


@pytest.mark.parametrize("temperature", [1.0, 1e30, 1e38, 1e300])
def test_top_k_does_not_depend_on_the_temperature(temperature):
    """top-k picks the k largest logits as given, at any temperature (at T ~ 1e38 the scaled gaps
    (x - max) / T underflowed to 0 and tied token 1 with the maximum: top_k=1 drew it too)."""
    logits = torch.tensor([[1.0, 1.0 - 1.2e-7, 0.5, -3.0]]).expand(2000, 4)
    assert logits[0, 0] != logits[0, 1]
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, temperature=temperature, top_k=1, generator=g).tolist()) == {0}
    assert set(sample(logits, temperature=temperature, top_k=2, generator=g).tolist()) == {0, 1}


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_bad_sampling_args(kw, name):
    with pytest.raises(ValueError, match=name):
        check_sampling_args(**kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 1e-30, 1e-12])
def test_tiny_temperature_is_greedy_never_nan(temperature, dtype):
    """T -> 0 is the argmax (logits / T used to overflow to inf: NaN probabilities, token 0)."""
    torch.manual_seed(3)
    logits = (torch.randn(64, 50) * 10).to(dtype)
    logits[:, 0] = -50.0  # token 0 is never the argmax
    g = torch.Generator().manual_seed(0)
    got = sample(logits, temperature=temperature, generator=g)
    assert torch.equal(got, logits.argmax(-1))
    got = sample(logits, temperature=temperature, top_k=5, top_p=0.9, generator=g)
    assert torch.equal(got, logits.argmax(-1))


def test_huge_temperature_is_uniform_and_keeps_masked_tokens_out():
    logits = torch.tensor([[0.0, float("-inf"), 5.0, -3.0]]).expand(20000, 4)
    for t in (1e30, 1e300):
        ids = sample(logits, temperature=t, generator=torch.Generator().manual_seed(4))
        freq = torch.bincount(ids, minlength=4).float() / ids.numel()
        assert freq[1] == 0  # -inf / T stays -inf (no NaN)
        torch.testing.assert_close(freq[[0, 2, 3]], torch.full((3,), 1 / 3), atol=0.02, rtol=0)


@pytest.mark.parametrize(
    "kw, exc, name",
    [
        ({"temperature": float("inf")}, ValueError, "temperature"),
        ({"temperature": float("-inf")}, ValueError, "temperature"),
        ({"temperature": "0.5"}, TypeError, "temperature"),
        ({"temperature": None}, TypeError, "temperature"),
        ({"temperature": True}, TypeError, "temperature"),
        ({"top_k": 2.0}, TypeError, "top_k"),
        ({"top_k": True}, TypeError, "top_k"),
        ({"top_p": "0.9"}, TypeError, "top_p"),
        ({"top_p": float("nan")}, ValueError, "top_p"),
    ],
)
def test_bad_sampling_args_types_and_non_finite(kw, exc, name):
    with pytest.raises(exc, match=name):
        check_sampling_args(**kw)
    if "temperature" in kw and exc is ValueError:
        with pytest.raises(ValueError, match="temperature"):
            sample(torch.randn(2, 5), temperature=kw["temperature"])


def test_numpy_numbers_are_accepted_and_normalized():
    np = pytest.importorskip("numpy")
    t, k, p = check_sampling_args(np.float32(0.5), np.int64(3), np.float64(0.9))
    assert (t, k, p) == (0.5, 3, 0.9) and type(t) is float and type(k) is int and type(p) is float
    assert check_sampling_args(1, None, 1) == (1.0, None, 1.0)


@pytest.mark.parametrize("kw, exc, name", [
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=-0.5), ValueError, "top_p"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=1.5), TypeError, "top_k"),
    (dict(temperature=None), TypeError, "temperature"),
    (dict(greedy="yes"), TypeError, "greedy"),
])
def test_sample_checks_its_own_arguments(kw, exc, name):
    # sample() is public: it must not turn a bad parameter into NaN probabilities (token 0).
    with pytest.raises(exc, match=name):
        sample(torch.randn(2, 5), **kw)


def test_sample_bad_logits():
    with pytest.raises(ValueError, match="non-empty vocabulary"):
        sample(torch.randn(2, 0))
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        sample(torch.arange(5))
    with pytest.raises(TypeError, match=r"logits must be a floating-point tensor \(\.\.\., vocab\)"):
        sample(torch.tensor(1.5))  # 0-d: no vocabulary dimension
    # everything after the logits is keyword-only: a positional 0.5 is no silent temperature
    for fn in (sample, sample_with_max):
        with pytest.raises(TypeError):
            fn(torch.randn(2, 5), 0.5)


def test_infinite_logits_take_all_the_probability():
    # +inf logits: the row maximum shift must not turn them into NaN (which gave token 0).
    logits = torch.tensor([[0.0, 1.0, float("inf"), 2.0], [float("inf"), 0.0, float("inf"), -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, temperature=0.7, generator=g) for _ in range(200)])
    assert (draws[:, 0] == 2).all()
    assert set(draws[:, 1].tolist()) == {0, 2}  # the two +inf tokens, both drawn


@pytest.mark.parametrize("kw, exc, name", [
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=2.0), TypeError, "top_k"),
])
def test_filter_logits_checks_its_arguments(kw, exc, name):
    # filter_logits is public too: top_p=0 used to mask every token (even the top one) and
    # top_k <= 0 failed inside torch with messages that did not name top_k.
    with pytest.raises(exc, match=name):
        filter_logits(torch.tensor([[1.0, 3.0, 2.0]]), **kw)
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        filter_logits(torch.arange(3), top_k=1)


def test_min_p_keeps_the_tokens_near_the_top():
    # probabilities ~[0.64, 0.24, 0.09, 0.03, 0.01]: min_p=0.3 keeps p >= 0.19 (tokens 0, 1); HF's
    # MinPLogitsWarper on the same logits keeps the same set, after the temperature
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).expand(5000, 5)
    g = torch.Generator().manual_seed(5)
    assert set(sample(logits, min_p=0.3, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, min_p=0.1, generator=g).tolist()) == {0, 1, 2}
    # temperature 2 flattens the ratios (p_i / p_max = exp(-gap / 2)): min_p=0.3 now keeps 3 tokens
    assert set(sample(logits, temperature=2.0, min_p=0.3, generator=g).tolist()) == {0, 1, 2}
    assert set(sample(logits, min_p=1.0, generator=g).tolist()) == {0}
    # off: None and 0 are the same draws as no min_p
    for off in (None, 0, 0.0):
        a = sample(logits[:50], min_p=off, generator=torch.Generator().manual_seed(9))
        assert torch.equal(a, sample(logits[:50], generator=torch.Generator().manual_seed(9)))
    f = filter_logits(torch.tensor([[1.0, 5.0, 3.0, 4.5]]), min_p=0.5)  # exp(-0.5) = 0.61 kept, exp(-2) not
    assert torch.isinf(f[0, [0, 2]]).all() and f[0, 1] == 5.0 and f[0, 3] == 4.5
    transformers = pytest.importorskip("transformers")
    warp = transformers.generation.logits_process.MinPLogitsWarper(min_p=0.3)
    hf = warp(None, torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]) / 2.0)
    assert torch.isinf(hf[0]).tolist() == [False, False, False, True, True]
    for bad, exc in ((-0.1, ValueError), (1.5, ValueError), ("0.1", TypeError), (True, TypeError),
                     (float("nan"), ValueError)):
        with pytest.raises(exc, match="min_p"):
            sample(logits, min_p=bad)


def test_repetition_penalty_is_hfs():
    from fastlm.sampling import apply_repetition_penalty, check_repetition_penalty

    transformers = pytest.importorskip("transformers")
    logits = torch.randn(3, 20) * 3
    ids = torch.tensor([[1, 5, 5, 7], [0, 19, 2, 2], [3, 3, 3, 3]])
    seen = torch.zeros(3, 20, dtype=torch.bool).scatter_(1, ids, True)
    for penalty in (1.3, 0.7):
        want = transformers.generation.logits_process.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        torch.testing.assert_close(apply_repetition_penalty(logits, seen, penalty), want)
        # bf16 logits: computed in fp32
        assert apply_repetition_penalty(logits.bfloat16(), seen, penalty).dtype == torch.float32
    assert check_repetition_penalty(None) is None and check_repetition_penalty(1) is None
    assert check_repetition_penalty(1.2) == 1.2
    for bad, exc in ((0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), ("1.2", TypeError)):
        with pytest.raises(exc, match="repetition_penalty"):
            check_repetition_penalty(bad)


def test_default_temperature_is_exactly_one():
    """The defaults are temperature 1 (the logits' own distribution): the same draws as
    temperature=1.0 passed explicitly (a default of 1.1 would flatten every model's sampling)."""
    logits = torch.randn(4096, 300) * 4
    want = sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(11))
    assert torch.equal(sample(logits, generator=torch.Generator().manual_seed(11)), want)
    tok, _ = sample_with_max(logits, generator=torch.Generator().manual_seed(11))
    assert torch.equal(tok, want)
    assert check_sampling_args() == (1.0, None, None)


def test_parameter_ranges_are_exact_at_their_edges():
    """top_p in (0, 1], min_p in [0, 1], repetition_penalty > 0: the valid values next to each
    bound are taken, the invalid ones just past it refused."""
    from fastlm.sampling import check_min_p, check_repetition_penalty

    for p in (1e-6, 1.0):
        assert check_sampling_args(top_p=p)[2] == p
    for p in (1.0 + 1e-9, 1.05):
        with pytest.raises(ValueError, match="top_p"):
            check_sampling_args(top_p=p)
    assert check_min_p(1.0) == 1.0 and check_min_p(1e-6) == 1e-6
    for m in (1.0 + 1e-9, 1.05):
        with pytest.raises(ValueError, match="min_p"):
            check_min_p(m)
    assert check_repetition_penalty(0.05) == 0.05 and check_repetition_penalty(1e-3) == 1e-3


def test_one_dimensional_logits_and_a_vocabulary_of_one():
    """logits (..., vocab) includes a single row (vocab,) -> a 0-d token, and a vocabulary of
    one token (always token 0), in every sampling mode."""
    g = torch.Generator().manual_seed(0)
    row = torch.tensor([0.0, 3.0, -1.0])
    assert sample(row, greedy=True).shape == () and int(sample(row, greedy=True)) == 1
    assert sample(row, temperature=0.5, top_k=2, top_p=0.9, min_p=0.1, generator=g).shape == ()
    assert int(sample(row, top_k=1, generator=g)) == 1
    assert filter_logits(row, top_k=1).isinf().tolist() == [True, False, True]
    one = torch.randn(4, 1)
    for kw in (dict(greedy=True), dict(), dict(temperature=0.3, top_k=1, top_p=0.5, min_p=0.9)):
        assert sample(one, generator=g, **kw).tolist() == [0, 0, 0, 0]


def test_filter_logits_min_p_is_per_row():
    """min_p compares each token with its own row's maximum (rows of different scales)."""
    logits = torch.tensor([[0.0, -0.5, -2.0, -9.0], [10.0, 9.6, 3.0, 9.0], [-4.0, -4.0, -4.1, -7.0]])
    f = filter_logits(logits, min_p=0.5)  # keeps a gap <= log 2 = 0.69 below the row's max
    assert f.isinf().tolist() == [[False, False, True, True], [False, False, True, True], [False, False, False, True]]
    want = torch.stack([filter_logits(r, min_p=0.5) for r in logits])
    assert torch.equal(f, want)


def test_min_p_keeps_a_token_exactly_at_the_threshold():
    """A token whose probability is exactly min_p times the top one's is kept (HF's rule:
    removed only below it)."""
    f = filter_logits(torch.tensor([0.0, math.log(0.5), -5.0]), min_p=0.5)
    assert f.isinf().tolist() == [False, False, True]


def test_top_p_drops_a_token_once_the_mass_before_it_reaches_top_p_exactly():
    """HF's nucleus: the smallest set whose mass reaches top_p. Two equal logits have
    probability exactly 0.5 each, so top_p=0.5 keeps one of them (the mass before the second
    is 0.5, which reaches top_p); any top_p above 0.5 keeps both."""
    logits = torch.zeros(16, 2)
    kept = filter_logits(logits, top_p=0.5).isfinite()
    assert kept.sum(-1).tolist() == [1] * 16
    assert filter_logits(logits, top_p=0.5000001).isfinite().all()
    draws = sample(logits, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert kept.gather(-1, draws[:, None]).all()  # only the kept token is ever drawn


def test_top_p_one_keeps_every_token():
    """top_p=1.0 is off: no token is dropped even when the top one's probability rounds the
    running mass to 1 before the tail (fp32: 1 - e^-30 == 1)."""
    logits = torch.tensor([[30.0, 0.0, 0.0, -1.0]])
    assert not filter_logits(logits, top_p=1.0).isinf().any()
    draws = sample(logits.expand(4000, 4), temperature=30.0, top_p=1.0, generator=torch.Generator().manual_seed(1))
    assert set(draws.tolist()) == {0, 1, 2, 3}


def test_a_small_temperature_still_samples():
    """Only temperature 0 is greedy: at 1e-3 or 0.1, two tied logits are both drawn (greedy
    would always return the first)."""
    logits = torch.tensor([[1.0, 1.0, -2.0]]).expand(400, 3)
    for t in (1e-3, 0.1):
        draws = sample(logits, temperature=t, generator=torch.Generator().manual_seed(2))
        assert set(draws.tolist()) == {0, 1}
