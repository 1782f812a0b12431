"""Device-side sampling: greedy, temperature, top-k, top-p, seeded reproducibility."""
import pytest
import torch

from fastlm.sampling import check_sampling_args, filter_logits, sample


def test_greedy_and_zero_temperature_are_argmax():
    logits = torch.randn(5, 37)
    assert torch.equal(sample(logits, greedy=True), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1))


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
