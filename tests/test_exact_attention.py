import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from streamsketch.attention import exact_attention  # noqa: E402


@pytest.mark.parametrize("H_kv", [8, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_matches_sdpa(H_kv, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 33, 16, generator=g)
    k = torch.randn(2, H_kv, 33, 16, generator=g)
    v = torch.randn(2, H_kv, 33, 16, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(exact_attention(q, k, v, causal=causal), ref, atol=1e-5, rtol=1e-5)


def test_poly_is_normalised_power_and_causal_bottom_right():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 4, generator=g, dtype=torch.float64) for n in (3, 7, 7))
    out = exact_attention(q, k, v, f=("poly", 3), causal=True)
    s = (q @ k.transpose(-1, -2)).abs() ** 3
    mask = torch.arange(7)[None, :] <= torch.arange(3)[:, None] + 4
    w = s.masked_fill(~mask, 0)
    torch.testing.assert_close(out, (w / w.sum(-1, keepdim=True)) @ v)


def test_errors_name_argument():
    q = torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match="multiple of k's heads"):
        exact_attention(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))
    with pytest.raises(ValueError, match="k must have head dim 8"):
        exact_attention(q, torch.randn(1, 4, 5, 7), torch.randn(1, 4, 5, 7))
    with pytest.raises(ValueError, match="f must be"):
        exact_attention(q, q, q, f="relu")
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        exact_attention(q, q, q.numpy())
