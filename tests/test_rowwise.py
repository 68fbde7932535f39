import pytest
import torch

import recsys_kernels as rk
from helpers import backend_params

PREPACK = {8: "embedding_bag_byte_prepack", 4: "embedding_bag_4bit_prepack"}


@pytest.mark.parametrize("device,backend", backend_params("quantize_rowwise"))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(1, 2), (7, 4), (33, 64), (5, 130), (0, 8)])
def test_quantize_matches_torch_prepack_bytes(device, backend, bits, shape):
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 10
    expected = getattr(torch.ops.quantized, PREPACK[bits])(w)
    got = rk.quantize_rowwise(w.to(device), bits, backend=backend).cpu()
    assert got.dtype == torch.uint8 and got.shape == expected.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("device,backend", backend_params("quantize_rowwise"))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_large_table_bytes(device, backend, bits, dtype):
    # Large enough that an ulp-level difference in the scale arithmetic shows up in some row.
    w = (torch.randn(20000, 64) * torch.rand(20000, 1) * 4).to(dtype)
    expected = getattr(torch.ops.quantized, PREPACK[bits])(w.float() if dtype == torch.bfloat16 else w)
    got = rk.quantize_rowwise(w.to(device), bits, backend=backend).cpu()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("device,backend", backend_params("quantize_rowwise"))
def test_4bit_rows_beyond_the_fp16_scale_and_bias_raise(device, backend):
    """A 4-bit row keeps its scale and bias as fp16: a finite row whose minimum or (max - min) / 15
    is beyond fp16's 65504 would read back as inf, which every reader refuses at lookup time;
    quantize_rowwise refuses it instead (torch's prepack stores the inf). 8 bits keep fp32 ones."""
    for row, value in [(2, -1e5), (3, 1e6)]:  # the bias, then the scale overflows
        w = torch.randn(5, 8, device=device)
        w[row, 1] = value
        with pytest.raises(ValueError, match="4-bit fp16 scale or bias"):
            rk.quantize_rowwise(w, 4, backend=backend)
        back = rk.dequantize_rowwise(rk.quantize_rowwise(w, 8, backend=backend), 8)
        torch.testing.assert_close(back, w, rtol=0, atol=abs(value) / 100)
    w = torch.randn(5, 8, device=device)
    w[3, 1] = 9e5  # (max - min) / 15 ~ 60,000: fits
    back = rk.dequantize_rowwise(rk.quantize_rowwise(w, 4, backend=backend), 4)
    torch.testing.assert_close(back, w, rtol=0, atol=9e5 / 15)


@pytest.mark.parametrize("device,backend", backend_params("dequantize_rowwise"))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.bfloat16])
def test_dequantize_roundtrip(device, backend, bits, out_dtype):
    w = torch.randn(40, 18)
    q = torch.ops.quantized.embedding_bag_byte_prepack(w) if bits == 8 else torch.ops.quantized.embedding_bag_4bit_prepack(w)
    got = rk.dequantize_rowwise(q.to(device), bits, output_dtype=out_dtype, backend=backend).cpu()
    assert got.dtype == (out_dtype or torch.float32)
    # value = code * scale + bias: the error is at most half a quantization step per row
    step = (w.amax(1, keepdim=True) - w.amin(1, keepdim=True)) / (255 if bits == 8 else 15)
    assert ((got.float() - w).abs() <= step * 0.5 + 2e-2 * (out_dtype is not None) + 1e-3).all()


@pytest.mark.parametrize("device,backend", backend_params("embedding_bag"))
@pytest.mark.parametrize("bits,d", [(8, 3), (8, 64), (4, 6), (4, 30)])
def test_one_gathered_row_of_a_packed_table(device, backend, bits, d):
    """One bag of one index: the reference dequantizes a one-row slice that sits at an odd byte
    offset of the table (regression: viewing its scale bytes as floats failed)."""
    packed = rk.quantize_rowwise(torch.randn(5, d), bits).to(device)
    for row in range(5):
        got = rk.embedding_bag(packed, torch.tensor([row], device=device), torch.tensor([0, 1], device=device),
                               bits=bits, backend=backend)
        expected = rk.dequantize_rowwise(packed, bits, backend="reference")[row:row + 1]
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_constant_rows_and_zero_rows():
    w = torch.tensor([[3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    for bits in (8, 4):
        q = rk.quantize_rowwise(w, bits)
        torch.testing.assert_close(rk.dequantize_rowwise(q, bits), w)


@pytest.mark.parametrize("bad,exc", [
    (lambda: rk.quantize_rowwise(torch.randn(4, 4), 3), ValueError),
    (lambda: rk.quantize_rowwise(torch.randn(4, 5), 4), ValueError),
    (lambda: rk.quantize_rowwise(torch.randint(0, 3, (4, 4)), 8), TypeError),
    (lambda: rk.quantize_rowwise(torch.randn(4), 8), ValueError),
    (lambda: rk.quantize_rowwise(torch.randn(4, 0), 8), ValueError),  # a table no reader takes
    (lambda: rk.quantize_rowwise(torch.randn(4, 0), 4), ValueError),
    (lambda: rk.dequantize_rowwise(torch.zeros(4, 4, dtype=torch.uint8), 4), ValueError),
    (lambda: rk.quantize_rowwise(torch.tensor([[1.0, float("nan")]]), 8), ValueError),
    (lambda: rk.dequantize_rowwise(torch.zeros(4, 8, dtype=torch.uint8), 8), ValueError),
    (lambda: rk.dequantize_rowwise(torch.zeros(4, 12), 8), TypeError),
    (lambda: rk.dequantize_rowwise(torch.full((2, 12), 255, dtype=torch.uint8), 8), ValueError),
])
def test_bad_input(bad, exc):
    with pytest.raises(exc):
        bad()
