"""Weight formats and their kernels: our reference decoders equal the gguf package's numpy dequantizer;
every native kernel, on every instruction-set level this machine runs, equals its reference twin on
awkward shapes and token counts; embeddings, fused and stacked rows, and the fallback without native
kernels."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from trillm.native import build
from trillm.weights import StackedLinear, can_concat_rows, concat_rows, make_embedding, make_linear
from trillm.weights.dense import DenseEmbedding, DenseLinear, ReferenceDenseEmbedding, ReferenceDenseLinear
from trillm.weights.linear import KERNEL_MAX_TOKENS, RowLinear
from trillm.weights.ggml import (
    BLOCK_LAYOUTS,
    GGMLEmbedding,
    GGMLLinear,
    GGMLTensor,
    INT8_ACTIVATION_BLOCKS,
    ReferenceGGMLEmbedding,
    ReferenceGGMLLinear,
    dequantize_ggml,
    quantize_q6_k,
    takes_int8,
)

Q = GGMLQuantizationType
GGML_TYPES = list(BLOCK_LAYOUTS)
QUANTIZABLE = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]  # the types gguf.quants.quantize implements
FP16_FIELDS = {  # byte offsets of each block's fp16 scales (and mins)
    Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2],
    Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
}
DENSE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

requires_native = pytest.mark.skipif(build.load() is None, reason="the native kernels could not be built")


def random_ggml(qtype, rows: int, cols: int, seed: int = 0) -> GGMLTensor:
    """Random bytes for every field, with fp16 scales in a sane range (random bits could be inf or NaN)."""
    block_elems, block_bytes = BLOCK_LAYOUTS[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block_elems, block_bytes), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        scales = rng.uniform(-0.05, 0.05, size=len(blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return GGMLTensor(qtype, torch.from_numpy(blocks.reshape(rows, -1)), (rows, cols))


def quantized_ggml(qtype, rows: int, cols: int, seed: int = 0) -> GGMLTensor:
    values = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return GGMLTensor(qtype, torch.from_numpy(gguf.quants.quantize(values, qtype)), (rows, cols))


def columns_for(qtype) -> int:
    return 3 * BLOCK_LAYOUTS[qtype][0]  # an odd number of blocks


def assert_matmul_close(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """Equal up to float32 summation order: 1e-5 of the largest sum of |w| |x| a row could reach."""
    scale = (x.abs().reshape(-1, x.shape[-1]).double() @ weight.abs().double().T).max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * scale)


# ---- Layouts and reference decoders -------------------------------------------------------------

def test_block_layouts_match_gguf():
    for qtype, layout in BLOCK_LAYOUTS.items():
        assert layout == gguf.GGML_QUANT_SIZES[qtype], qtype.name


@pytest.mark.parametrize("qtype", GGML_TYPES, ids=lambda t: t.name)
def test_reference_decoder_equals_gguf(qtype):
    weights = [random_ggml(qtype, 5, 2 * BLOCK_LAYOUTS[qtype][0])]
    if qtype in QUANTIZABLE:
        weights.append(quantized_ggml(qtype, 5, 64))
    for weight in weights:
        expected = torch.from_numpy(gguf.quants.dequantize(weight.data.numpy(), qtype))
        torch.testing.assert_close(dequantize_ggml(weight), expected, rtol=0, atol=0)


def test_unsupported_or_inconsistent_ggml_is_refused():
    with pytest.raises(ValueError, match="Q2_K is not supported"):
        make_linear(GGMLTensor(Q.Q2_K, torch.zeros(4, 84, dtype=torch.uint8), (4, 256)))
    with pytest.raises(ValueError, match="needs uint8 data of shape"):
        make_linear(GGMLTensor(Q.Q8_0, torch.zeros(4, 33, dtype=torch.uint8), (4, 32)))
    # every GGML type has an int8 kernel (Q5_0: the half of SmolLM2's Q4_K_M that is not Q4_K or Q6_K)
    assert set(INT8_ACTIVATION_BLOCKS) == set(BLOCK_LAYOUTS)
    assert make_linear(random_ggml(Q.Q5_0, 4, 32), int8_activations=True).int8_activations


def test_q6_k_quantizer_blocks_decode_as_gguf_reads_them():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(301, 512, generator=generator) * torch.rand(301, 1, generator=generator)
    weight[0, :256] = 0  # an all-zero block
    weight[1, :16] = 0  # an all-zero sub-block
    weight[2, 5] = 40.0  # an outlier: the other sub-blocks' scales become small integers
    done = []
    quantized = quantize_q6_k(weight.bfloat16(), lambda start, end: done.append((start, end)))
    assert quantized.type == Q.Q6_K and quantized.shape == (301, 512) and quantized.data.shape == (301, 2 * 210)
    assert done[0][0] == 0 and done[-1][1] == 301 and all(a[1] == b[0] for a, b in zip(done, done[1:]))
    decoded = dequantize_ggml(quantized)
    assert torch.equal(decoded, torch.from_numpy(gguf.quants.dequantize(quantized.data.numpy(), Q.Q6_K)))

    # Each weight is within a step of its block's largest sub-block scale (max|w| / 32): half a step, but
    # +max and -max in one sub-block put one of them on the code 32, one past the largest (31). The rms
    # error is what this scale choice gives Gaussian weights: 1.9% of their rms (llama.cpp's search: 1.8%).
    weight = weight.bfloat16().float()
    error = (decoded - weight).reshape(-1, 256)
    assert (error.abs() <= weight.reshape(-1, 256).abs().amax(dim=1, keepdim=True) / 32 * 1.01).all()
    assert torch.equal(decoded[0, :256], torch.zeros(256)) and torch.equal(decoded[1, :16], torch.zeros(16))
    gaussian = torch.randn(200, 2560, generator=generator)
    relative_rms = (dequantize_ggml(quantize_q6_k(gaussian)) - gaussian).pow(2).mean().sqrt()
    assert 0.017 < relative_rms < 0.02
    with pytest.raises(ValueError, match="Q6_K rows hold blocks of 256 weights; 96 columns do not fit"):
        quantize_q6_k(torch.zeros(2, 96))


# ---- Native kernels against their reference twins -----------------------------------------------

@pytest.mark.parametrize("tokens", [1, 3, 8, 20, 40])
@pytest.mark.parametrize("qtype", GGML_TYPES, ids=lambda t: t.name)
def test_ggml_linear_equals_reference(native_level, qtype, tokens):
    cols = columns_for(qtype)
    for rows in (7, 33, 100):
        weight = random_ggml(qtype, rows, cols, seed=rows)
        x = torch.randn(tokens, cols)
        native_layer, reference = GGMLLinear(weight), ReferenceGGMLLinear(weight)
        assert (native_layer.in_features, native_layer.out_features) == (cols, rows)
        assert native_layer.stored_bytes == weight.data.numel()
        assert_matmul_close(native_layer(x), reference(x), x, dequantize_ggml(weight))


@pytest.mark.parametrize("qtype", GGML_TYPES, ids=lambda t: t.name)
def test_kernel_takes_many_tokens_in_passes(native_level, qtype, monkeypatch):
    monkeypatch.setattr(RowLinear, "kernel_max_tokens", 1000)  # 20 tokens in 3 kernel passes, whatever the limit
    weight = random_ggml(qtype, 33, columns_for(qtype))
    x = torch.randn(2, 10, weight.shape[1])  # leading dimensions are kept
    y = GGMLLinear(weight)(x)
    assert y.shape == (2, 10, 33)
    assert_matmul_close(y, ReferenceGGMLLinear(weight)(x), x, dequantize_ggml(weight))


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.Q6_K], ids=lambda t: t.name)
def test_threads_split_rows_without_changing_results(native_level, qtype):
    weight = random_ggml(qtype, 1001, 512)  # large enough to be split over threads
    x = torch.randn(3, 512)
    layer = GGMLLinear(weight)
    outputs = []
    for threads in (1, 2, 3):
        build.set_num_threads(threads)
        outputs.append(layer(x))
    build.set_num_threads(0)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert_matmul_close(outputs[0], ReferenceGGMLLinear(weight)(x), x, dequantize_ggml(weight))


def int8_test_inputs(tokens: int, cols: int) -> torch.Tensor:
    """Activations with outliers, and a block whose scale is 1 (max 127), so that x * 127 / max|x| hits
    halves: the kernel must round them to even as the reference does."""
    x = torch.randn(tokens, cols) * torch.rand(tokens, 1) * 4
    x[0, 7] = 30.0
    x[0, -256:] = (torch.arange(256) - 128) / 2  # -64, -63.5, ..., 63.5
    x[0, -256] = 127.0
    return x


def assert_int8_matmul_equal(actual: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """The int8 kernel's integer sums are exact: only the float32 rounding of the block totals, their scales
    and their sum remains, ~1e-7 of the largest sum of |w| |x|. One activation rounded differently (a scale
    computed another way) moves results by its step times |w|, far more."""
    scale = (x.abs().reshape(-1, x.shape[-1]).double() @ weight.abs().double().T).max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("qtype", list(INT8_ACTIVATION_BLOCKS), ids=lambda t: t.name)
@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 20, 40])
def test_int8_kernels_equal_their_reference(native_level, qtype, tokens):
    """Random bytes reach the extremes the integer steps must hold (Q8_0's -128, Q6_K's codes 0 and 63
    and scales -128 and 127)."""
    block = INT8_ACTIVATION_BLOCKS[qtype]
    for rows, cols in ((7, 256), (33, 768), (100, 2560)):
        weight = random_ggml(qtype, rows, cols, seed=rows)
        x = int8_test_inputs(tokens, cols)
        native_layer = GGMLLinear(weight, int8_activations=True)
        actual, expected = native_layer(x), ReferenceGGMLLinear(weight, int8_activations=True)(x)
        float_matmul = ReferenceGGMLLinear(weight)(x)
        if not takes_int8(weight, True, tokens):  # this type's prompts: float activations
            assert_matmul_close(actual, float_matmul, x, dequantize_ggml(weight))
            continue
        assert_int8_matmul_equal(actual, expected, x, dequantize_ggml(weight))
        # The same matmul up to the activations' rounding: at most half a step (max|x| / 127 of its block)
        # times |w| for each product.
        half_steps = (x.abs().unflatten(-1, (-1, block)).amax(dim=-1, keepdim=True) / 254).expand(-1, -1, block)
        bound = half_steps.flatten(1) @ dequantize_ggml(weight).abs().T
        assert ((actual - float_matmul).abs() <= bound * 1.001 + 1e-4).all()
        build.set_num_threads(1)
        single_thread = native_layer(x)
        build.set_num_threads(0)
        assert torch.equal(single_thread, actual)
        assert native_layer(x[:0]).shape == (0, rows)


@pytest.mark.parametrize("tokens", [1, 3, 8, 20, 40])
@pytest.mark.parametrize("dtype", DENSE_DTYPES, ids=str)
def test_dense_linear_equals_reference(native_level, dtype, tokens):
    for rows, cols in ((7, 90), (33, 130), (100, 576)):  # columns that leave a tail after the vectors
        weight = torch.randn(rows, cols).to(dtype)
        x = torch.randn(tokens, cols)
        layer = DenseLinear(weight)
        assert layer.weight.dtype == dtype  # kept as stored, not upcast
        assert layer.stored_bytes == weight.numel() * weight.element_size()
        assert_matmul_close(layer(x), ReferenceDenseLinear(weight)(x), x, weight.float())


def test_dense_linear_reads_strided_rows_and_adds_bias(native_level):
    storage = torch.randn(40, 200)
    weight, bias = storage[:, 10:150], torch.randn(40)  # rows 200 floats apart
    x = torch.randn(2, 140)
    assert_matmul_close(DenseLinear(weight, bias)(x), torch.nn.functional.linear(x, weight, bias), x, weight)


# ---- Embeddings and fused rows ----------------------------------------------------------------------

@pytest.mark.parametrize("qtype", GGML_TYPES, ids=lambda t: t.name)
def test_ggml_embedding_decodes_looked_up_rows(native_level, qtype):
    weight = random_ggml(qtype, 50, columns_for(qtype))
    ids = torch.tensor([[3, 0, 49], [3, 17, 1]])
    expected = dequantize_ggml(weight)[ids]
    assert torch.equal(GGMLEmbedding(weight)(ids), expected)
    assert torch.equal(ReferenceGGMLEmbedding(weight)(ids), expected)
    for bad_id in (50, -1):
        with pytest.raises(IndexError):
            GGMLEmbedding(weight)(torch.tensor([bad_id]))
        with pytest.raises(IndexError):
            ReferenceGGMLEmbedding(weight)(torch.tensor([bad_id]))


@pytest.mark.parametrize("dtype", DENSE_DTYPES, ids=str)
def test_dense_embedding_and_whole_matrix_decode(native_level, dtype):
    weight = torch.randn(50, 90).to(dtype)
    ids = torch.tensor([[3, 0, 49], [3, 17, 1]])
    embedding = make_embedding(weight)
    assert isinstance(embedding, DenseEmbedding) and embedding.weight.dtype == dtype
    assert torch.equal(embedding(ids), weight.float()[ids])
    assert torch.equal(ReferenceDenseEmbedding(weight)(ids), weight.float()[ids])
    assert torch.equal(DenseLinear(weight).float_weight(), weight.float())


def test_every_fp16_scale_decodes_exactly(native_level):
    """Q8_0 blocks whose scale d takes each of the 65536 fp16 bit patterns (zeros, subnormals, infinities,
    NaNs) and whose codes are 1: each row decodes to d itself, as torch converts it."""
    scales = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    blocks = torch.cat([scales.view(torch.uint8).view(-1, 2), torch.ones(65536, 32, dtype=torch.uint8)], dim=1)
    embedding = make_embedding(GGMLTensor(Q.Q8_0, blocks, (65536, 32)))
    decoded = embedding(torch.arange(65536))[:, 0]
    expected = scales.float()
    assert torch.equal(decoded.isnan(), expected.isnan())
    assert torch.equal(decoded[~expected.isnan()], expected[~expected.isnan()])


def test_concat_rows_fuses_ggml_and_dense_weights(native_level):
    q, k, v = (random_ggml(Q.Q4_1, rows, 64, seed=rows) for rows in (12, 4, 4))
    fused = concat_rows([q, k, v])
    assert fused.type == Q.Q4_1 and fused.shape == (20, 64)
    x = torch.randn(2, 64)
    separate = torch.cat([make_linear(w)(x) for w in (q, k, v)], dim=-1)
    assert torch.equal(make_linear(fused)(x), separate)

    gate, up = torch.randn(6, 90, dtype=torch.bfloat16), torch.randn(6, 90, dtype=torch.bfloat16)
    assert torch.equal(concat_rows([gate, up]), torch.cat([gate, up]))

    assert not can_concat_rows([q, random_ggml(Q.Q8_0, 4, 64)])
    with pytest.raises(ValueError, match="formats and columns must match"):
        concat_rows([q, random_ggml(Q.Q4_1, 4, 96)])
    with pytest.raises(ValueError, match="formats and columns must match"):
        concat_rows([gate, up.float()])


def test_a_list_of_weights_is_one_layer_over_their_stacked_rows(native_level):
    """One matmul where the weights share format and columns; where they do not (a Q4_K_M file's Q6_K
    value projection beside Q4_K queries and keys), one each, the outputs side by side."""
    x = torch.randn(3, 256)
    q, k = random_ggml(Q.Q4_K, 12, 256, seed=1), random_ggml(Q.Q4_K, 4, 256, seed=2)
    for v in (random_ggml(Q.Q4_K, 4, 256, seed=3), random_ggml(Q.Q6_K, 4, 256, seed=3)):
        layer = make_linear([q, k, v])
        assert isinstance(layer, StackedLinear) == (v.type != q.type)
        separate = torch.cat([ReferenceGGMLLinear(w)(x) for w in (q, k, v)], dim=-1)
        assert layer(x).shape == (3, 20)
        assert_matmul_close(layer(x), separate, x, torch.cat([dequantize_ggml(w) for w in (q, k, v)]))


# ---- Without native kernels ----------------------------------------------------------------------

@requires_native
def test_factory_falls_back_to_reference_twins(fresh_native, monkeypatch):
    quantized, dense = random_ggml(Q.Q4_K, 33, 256), torch.randn(33, 90, dtype=torch.float16)
    ids = torch.tensor([0, 5, 32])
    x_quantized, x_dense = torch.randn(3, 256), torch.randn(3, 90)
    native_outputs = [make_linear(quantized)(x_quantized), make_linear(dense)(x_dense),
                      make_embedding(quantized)(ids)]

    monkeypatch.setenv("TRILLM_ISA", "reference")
    build.load.cache_clear()
    layers = [make_linear(quantized), make_linear(dense), make_embedding(quantized)]
    assert [type(layer) for layer in layers] == [ReferenceGGMLLinear, ReferenceDenseLinear, ReferenceGGMLEmbedding]
    assert_matmul_close(layers[0](x_quantized), native_outputs[0], x_quantized, dequantize_ggml(quantized))
    assert_matmul_close(layers[1](x_dense), native_outputs[1], x_dense, dense.float())
    assert torch.equal(layers[2](ids), native_outputs[2])


def test_prompts_in_bf16_where_asked(native_level):
    """With prompt_bf16 a prompt's matmul rounds x, W and the product to bfloat16, the native module and its
    twin alike; a decode step's stays the float32 kernel's."""
    generator = torch.Generator().manual_seed(4)
    bias = torch.randn(48, generator=generator)
    for weight, reference in [(torch.randn(48, 64, generator=generator).bfloat16(), ReferenceDenseLinear),
                              (random_ggml(GGMLQuantizationType.Q8_0, 48, 64), ReferenceGGMLLinear)]:
        exact, native = make_linear(weight, bias), make_linear(weight, bias, prompt_bf16=True)
        twin = reference(weight, bias)
        twin.prompt_bf16 = True
        prompt = torch.randn(KERNEL_MAX_TOKENS + 1, 64, generator=generator)
        expected = (prompt.bfloat16() @ exact.float_weight().bfloat16().T).float() + bias
        torch.testing.assert_close(native(prompt), expected, rtol=0, atol=0)
        torch.testing.assert_close(twin(prompt), expected, rtol=0, atol=0)
        assert not torch.equal(exact(prompt), native(prompt))
        token = prompt[:1]
        torch.testing.assert_close(native(token), exact(token), rtol=0, atol=0)
