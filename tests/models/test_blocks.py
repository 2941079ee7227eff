import pytest
import torch

from bids_cadiff.models.blocks import TACA, DualTimeResBlock, DynamicConv1d, sinusoidal_embedding


def test_sinusoidal_embedding_shape_and_distinct_rows():
    emb = sinusoidal_embedding(torch.tensor([0, 1, 500, 1000]), 33)
    assert emb.shape == (4, 33)
    assert torch.cdist(emb, emb).fill_diagonal_(1).min() > 0


@pytest.mark.parametrize("dims,shape", [(3, (5, 6, 7)), (2, (9, 11))])
def test_res_block_shape_and_time_dependence(dims, shape):
    block = DualTimeResBlock(dims, 6, 8, 16)
    x = torch.randn(2, 6, *shape)
    e1, e2 = torch.randn(2, 16), torch.randn(2, 16)
    out = block(x, e1, e2)
    assert out.shape == (2, 8, *shape)
    assert not torch.allclose(out, block(x, e1 + 1, e2))
    assert not torch.allclose(out, block(x, e1, e2 + 1))


def test_dynamic_conv_mixes_kernels_by_time_embedding():
    conv = DynamicConv1d(7, 4, 16)
    x = torch.randn(3, 1, 20)
    t = torch.randn(3, 16)
    out = conv(x, t)
    assert out.shape == (3, 1, 20)
    # each sample uses its own mixture: equals a plain conv with the mixed kernel
    pi = torch.softmax(conv.attention(t), 1)
    for b in range(3):
        w = (pi[b] @ conv.weight).reshape(1, 1, 7)
        ref = torch.nn.functional.conv1d(x[b : b + 1], w, (pi[b] @ conv.bias).reshape(1), padding=3)
        torch.testing.assert_close(out[b : b + 1], ref)


def test_taca_formula_and_shapes():
    taca = TACA(16, (7, 11, 15), 4)
    fe, fd = torch.randn(2, 5, 4, 5, 6), torch.randn(2, 7, 4, 5, 6)
    ed, em = torch.randn(2, 16), torch.randn(2, 16)
    out = taca(fe, fd, ed, em)
    assert out.shape == (2, 12, 4, 5, 6)
    f_cat = torch.cat([fe, fd], 1)
    ratio = out / f_cat - 1  # = mask, in (0, 1), constant over space per channel
    assert ((ratio > 0) & (ratio < 1)).all()
    torch.testing.assert_close(ratio, ratio[..., :1, :1, :1].expand_as(ratio), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, taca(fe, fd, ed + 1, em))
