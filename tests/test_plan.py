"""Decode plans (native/plan.py): a recorded step, run again, gives exactly the logits of the model's own
forward at every later position, for each family and format; steps that cannot be a plan run in Python,
unchanged; a plan belongs to the cache it was recorded over."""

import pytest
import torch
from torch import nn

import trillm
from test_gguf_llama import write_case
from test_llama import save_random_llama
from trillm.engine import Session, decode_one_token, prefill
from trillm.models.layers import KVCache, rope_cos_sin
from trillm.native import build, ops
from trillm.native.plan import DecodePlan
from trillm.synth import write_preset
from trillm.weights import make_embedding, make_linear

requires_native = pytest.mark.skipif(build.load() is None, reason="the native kernels could not be built")


def decode(network, steps: int, planned: bool, monkeypatch, prompt=(3, 1, 4, 1, 5)) -> tuple[torch.Tensor, Session]:
    """The logits of `steps` decode steps after the prompt, with plans or without; and the session."""
    monkeypatch.setenv("TRILLM_PLAN", "1" if planned else "0")
    with torch.inference_mode():
        session = Session(network.new_cache(1, 32))
        if prompt:
            prefill(network, session, list(prompt))
        logits = [decode_one_token(network, session, 9 + 2 * i) for i in range(steps)]
    return torch.stack(logits), session


def assert_plan_equals_forward(network, monkeypatch, steps: int = 6, prompt=(3, 1, 4, 1, 5)):
    expected, _ = decode(network, steps, False, monkeypatch, prompt)
    actual, session = decode(network, steps, True, monkeypatch, prompt)
    assert session.plan[1] is not None, "the step should have been recorded as a plan"
    assert torch.equal(actual, expected)


@requires_native
@pytest.mark.parametrize("activations", ["float32", "int8"])
def test_smollm2_gguf_plan(monkeypatch, activations):
    """The shipped model: Q4_1 and Q8_0 blocks, the GGML embedding, a tied Q8_0 head."""
    assert_plan_equals_forward(trillm.load(activations=activations).network, monkeypatch)


@requires_native
def test_llama_folder_plan(tmp_path, monkeypatch):
    """Dense bf16 weights and embedding, untied head."""
    save_random_llama(tmp_path, {"tie_word_embeddings": False}, dtype=torch.bfloat16)
    assert_plan_equals_forward(trillm.load(tmp_path).network, monkeypatch)


@requires_native
@pytest.mark.parametrize("activations", ["float32", "int8"])
def test_llama_gguf_with_mixed_types_plan(tmp_path, monkeypatch, activations):
    """As llama.cpp's Q4_K_M writes files: q/k/v and gate/up of several types, one matmul each, concatenated."""
    write_case(tmp_path, "mixed-types-gqa2-tied")
    assert_plan_equals_forward(trillm.load(tmp_path / "model.gguf", activations=activations).network, monkeypatch)


@requires_native
def test_bitnet_plan(tmp_path, monkeypatch):
    """Ternary weights, sub-norms, squared ReLU, a Q6_K head with int8 activations."""
    write_preset("bitnet-tiny", tmp_path / "bitnet")
    assert_plan_equals_forward(trillm.load(tmp_path / "bitnet").network, monkeypatch)


@requires_native
@pytest.mark.parametrize("layout", ["release", "gguf"])
def test_gpt_oss_plan(tmp_path, monkeypatch, layout):
    """Routing, MXFP4 experts (llama.cpp's two banks interleaved), sinks, sliding windows, biases."""
    path = tmp_path / ("gpt-oss.gguf" if layout == "gguf" else "gpt-oss")
    write_preset("gpt-oss-tiny", path, layout)
    assert_plan_equals_forward(trillm.load(path).network, monkeypatch, steps=10)


class WindowedAttention(nn.Module):
    """The smallest network whose decode step is a plan with a sliding window: embedding, fused projection,
    one-token attention over a ring of `window` slots, head."""

    def __init__(self, window: int):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.kv_heads, self.head_dim, self.window = 4, 2, 8, window
        self.embedding = make_embedding(torch.randn(50, 32))
        self.qkv = make_linear(torch.randn(64, 32) * 0.2)
        self.head = make_linear(torch.randn(50, 32) * 0.2, torch.randn(50))
        self.sinks = torch.randn(4)
        self.inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)

    def new_cache(self, batch, length):
        rope = rope_cos_sin(self.inv_freq, torch.arange(length))
        return KVCache(1, batch, self.kv_heads, self.head_dim, length, [self.window], rope)

    def forward(self, ids, cache, start, last_only=False):
        cos, sin = cache.rope[0][start:start + 1], cache.rope[1][start:start + 1]
        qkv = self.qkv(self.embedding(ids)).view(1, 1, -1, self.head_dim)
        out = ops.attend_one_token(qkv, cos, sin, cache.keys[0], cache.values[0], start, self.heads, self.sinks,
                                   self.window)
        return self.head(out)


@requires_native
def test_plan_attention_follows_the_ring_past_its_window(monkeypatch):
    assert_plan_equals_forward(WindowedAttention(window=4), monkeypatch, steps=12, prompt=())


class UnplannableAttention(nn.Module):
    """WindowedAttention with a torch op no plan step runs."""

    def __init__(self):
        super().__init__()
        self.inner = WindowedAttention(window=4)
        self.new_cache = self.inner.new_cache

    def forward(self, ids, cache, start, last_only=False):
        return self.inner(ids, cache, start) * 2


@requires_native
def test_unplannable_steps_run_in_python(monkeypatch):
    network = UnplannableAttention()
    expected, _ = decode(network, 6, False, monkeypatch, prompt=())
    actual, session = decode(network, 6, True, monkeypatch, prompt=())
    assert session.plan is not None and session.plan[1] is None
    assert torch.equal(actual, expected)


@requires_native
def test_a_plan_belongs_to_its_cache(monkeypatch):
    network = trillm.load().network
    monkeypatch.setenv("TRILLM_PLAN", "1")
    with torch.inference_mode():
        session = Session(network.new_cache(1, 16))
        decode_one_token(network, session, 5)
        first = session.plan[1]
        session.cache, session.tokens = network.new_cache(1, 16), []
        decode_one_token(network, session, 5)
        assert session.plan[1] is not first and session.plan[0] is session.cache
        with pytest.raises(ValueError, match="position 16 is past the cache's 16 positions"):
            session.plan[1].run(5, 16)


def test_steps_without_native_kernels_are_not_planned(monkeypatch):
    network = WindowedAttention(window=4)
    monkeypatch.setattr("trillm.native.plan.load", lambda: None)
    with torch.inference_mode():
        assert DecodePlan.record(network, network.new_cache(1, 8), 3, 0) == (None, None)
        session = Session(network.new_cache(1, 8))
        logits = decode_one_token(network, session, 3)
    assert session.plan[1] is None and logits.shape == (50,)
