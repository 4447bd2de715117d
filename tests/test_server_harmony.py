"""`trillm serve` with gpt-oss, on a synthetic gpt-oss whose network is made to say a script: the reasoning
(harmony's analysis channel) as reasoning_content and reasoning, whole and streamed; reasoning_effort
reaching the prompt; and a function tool's round trip through the official openai client (the call parsed
into tool_calls, its result rendered as harmony's tool message in the next prompt)."""

import json

import openai
import pytest
import torch

import trillm
from server_support import running_server
from trillm.synth.gpt_oss import gpt_oss_config, has_vocabulary, write_gpt_oss

pytestmark = pytest.mark.skipif(not has_vocabulary(), reason="quicktok (o200k_harmony) missing")

REASONED = "<|channel|>analysis<|message|>The user greets. Answer kindly.<|end|><|start|>assistant" \
           "<|channel|>final<|message|>Hello there!<|return|>"
CALL = "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary " \
       'to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
ANSWER = "<|channel|>final<|message|>It is sunny in Paris.<|return|>"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


class ScriptedNetwork:
    """The model's network, but its logits make it say `script` (token ids) after each prompt; the prompts
    it ran are kept (`prompts`: each the tokens of a prefill, after what the slot already held)."""

    def __init__(self, network):
        self.network, self.config = network, network.config
        self.script, self.prompts, self.prompt_end = [], [], 0

    def new_cache(self, batch, max_length):
        return self.network.new_cache(batch, max_length)

    def __call__(self, input_ids, cache, start, last_only):
        assert isinstance(start, int), "one request at a time here"
        if input_ids.shape[1] > 1:  # a prompt: the script starts after it
            self.prompts.append(input_ids[0].tolist())
            self.prompt_end = start + input_ids.shape[1]
        logits = torch.full((1, 1, self.config.vocab_size), float("-inf"))  # any sampling picks the script's
        logits[0, 0, self.script[start + input_ids.shape[1] - self.prompt_end]] = 0.0
        return logits


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = write_gpt_oss(tmp_path_factory.mktemp("gpt-oss-tiny"), gpt_oss_config("gpt-oss-tiny"))
    model = trillm.load(folder)
    network = ScriptedNetwork(model.network)
    model.network = network
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRILLM_PLAN", "0")  # the decode plan would record the real network's kernels
        with running_server(model, parallel=1) as (url, server):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            yield client, server, model, network


def say(served, reply: str):
    _, _, model, network = served
    network.script = model.tokenizer.encode(reply, add_special_tokens=False)


def test_reasoning_comes_apart_from_the_answer(served):
    client, server, model, network = served
    say(served, REASONED)
    reply = client.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=100, reasoning_effort="high")
    message = reply.choices[0].message
    assert message.content == "Hello there!" and reply.choices[0].finish_reason == "stop"
    assert message.reasoning_content == message.reasoning == "The user greets. Answer kindly."
    assert "Reasoning: high" in model.tokenizer.decode(network.prompts[-1], skip_special_tokens=False)
    assert reply.usage.completion_tokens == len(network.script) - 1  # all but <|return|>

    chunks = list(client.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": "Hey"}],
                                                 max_tokens=100, stream=True, reasoning_effort="low"))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "The user greets. Answer kindly."
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == "The user greets. Answer kindly."
    assert "".join(d.content or "" for d in deltas) == "Hello there!"
    first_answer = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not getattr(d, "reasoning_content", None) for d in deltas[first_answer:])  # reasoning came first
    assert "Reasoning: low" in model.tokenizer.decode(network.prompts[-1], skip_special_tokens=False)


def test_a_tool_call_round_trip(served):
    client, server, model, network = served
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    say(served, CALL)
    reply = client.chat.completions.create(model=server.model_id, messages=messages, tools=TOOLS, max_tokens=100)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.reasoning_content == "Need the weather."
    prompt = model.tokenizer.decode(network.prompts[-1], skip_special_tokens=False)
    assert "namespace functions" in prompt and "get_weather" in prompt

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny"})}]
    say(served, ANSWER)
    streamed = list(client.chat.completions.create(model=server.model_id, messages=messages, tools=TOOLS,
                                                   max_tokens=100, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "It is sunny in Paris."
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "stop"
    held = model.tokenizer.decode(server.scheduler.sessions[0].tokens, skip_special_tokens=False)
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"sky": "sunny"}' in held
    assert 'to=functions.get_weather' in held and '{"city":"Paris"}' in held


def test_a_streamed_tool_call_comes_with_its_finish_reason(served):
    client, server, _, _ = served
    say(served, CALL)
    chunks = list(client.chat.completions.create(model=server.model_id, tools=TOOLS, max_tokens=100, stream=True,
                                                 messages=[{"role": "user", "content": "Weather in Paris?"}]))
    calls = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])]
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", '{"city":"Paris"}')]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_bad_harmony_requests_are_400(served):
    client, server, _, _ = served
    for messages, tools, effort in (
            ([{"role": "tool", "tool_call_id": "nope", "content": "x"}], None, None),
            ([{"role": "user", "content": "x"}], [{"type": "function"}], None),
            ([{"role": "user", "content": "x"}], None, "extreme")):
        extra = {"tools": tools} if tools else {}
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=server.model_id, messages=messages, max_tokens=5,
                                           **extra, **({"reasoning_effort": effort} if effort else {}))
