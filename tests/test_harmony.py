"""gpt-oss's harmony chat: prompts as openai-harmony renders them (the chat's system prompt as developer
instructions, the reasoning effort, earlier replies by their answers), replies parsed into the analysis and
final channels, <|return|> ending a reply and <|end|> not, the o200k_base file written from the model's own
vocabulary, and the CLI showing the reasoning apart from the answer; OpenAI's function tools, offered, called
and answered as harmony renders them, a reply's call parsed apart from its answer and ending it at <|call|>."""

from types import SimpleNamespace

import pytest
import torch

import trillm
from trillm.cli import chat_turn, print_reply
from trillm.chat import Conversation
from trillm.engine import Sampling, Session
from trillm.errors import CheckpointError, TrillmError
from trillm.harmony import write_o200k_base
from trillm.synth.gpt_oss import gpt_oss_config, has_vocabulary, write_gpt_oss

pytestmark = pytest.mark.skipif(not has_vocabulary(), reason="quicktok (o200k_harmony) missing")
harmony = pytest.importorskip("openai_harmony")

REPLY = "<|channel|>analysis<|message|>The user greets. Answer kindly.<|end|><|start|>assistant<|channel|>final" \
        "<|message|>Hello there!<|return|>"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = write_gpt_oss(tmp_path_factory.mktemp("gpt-oss-tiny"), gpt_oss_config("gpt-oss-tiny"))
    return trillm.load(folder)


class ScriptedNetwork:
    """The model's network, but its logits make it say `script` (token ids) after whatever prompt."""

    def __init__(self, network, script: list[int]):
        self.network, self.script, self.config = network, script, network.config
        self.prompt_end = None

    def new_cache(self, batch, max_length):
        return self.network.new_cache(batch, max_length)

    def __call__(self, input_ids, cache, start, last_only):
        if self.prompt_end is None:
            self.prompt_end = start + input_ids.shape[1]
        logits = torch.zeros(1, 1, self.config.vocab_size)
        logits[0, 0, self.script[start + input_ids.shape[1] - self.prompt_end]] = 1.0
        return logits


def say(model, monkeypatch, reply: str) -> ScriptedNetwork:
    """Have the model say `reply` (harmony text) to whatever prompt."""
    network = ScriptedNetwork(model.network, model.tokenizer.encode(reply, add_special_tokens=False))
    monkeypatch.setattr(model, "network", network)
    return network


@pytest.fixture
def scripted(model, monkeypatch):
    return model, say(model, monkeypatch, REPLY)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi again"}]


def test_prompts_are_harmonys_own(model):
    h = harmony
    encoding = model.harmony.encoding  # openai-harmony's, with the o200k_base file trillm wrote
    from datetime import date

    for effort in ("low", "medium", "high"):
        system = h.SystemContent.new().with_reasoning_effort(h.ReasoningEffort(effort.capitalize())) \
            .with_conversation_start_date(date.today().isoformat())
        expected = encoding.render_conversation_for_completion(h.Conversation.from_messages([
            h.Message.from_role_and_content(h.Role.SYSTEM, system),
            h.Message.from_role_and_content(h.Role.DEVELOPER, h.DeveloperContent.new().with_instructions("Be brief.")),
            h.Message.from_role_and_content(h.Role.USER, "Hi"),
            h.Message.from_role_and_content(h.Role.ASSISTANT, "Hello.").with_channel("final"),
            h.Message.from_role_and_content(h.Role.USER, "Hi again"),
        ]), h.Role.ASSISTANT)
        assert model.chat_prompt(MESSAGES, effort) == expected
    text = model.tokenizer.decode(model.chat_prompt(MESSAGES, "high"))
    assert "Reasoning: high" in text and "# Instructions\n\nBe brief." in text and text.endswith("<|start|>assistant")


def test_our_tokenizer_encodes_text_as_harmony_does(model):
    encoding = model.harmony.encoding
    for text in ["Hello, world!", "def f(x):\n    return x ** 2  # square", "Grüße aus Köln, 12345 Einwohner",
                 "  spaces\t\ttabs\n\nlines", "日本語のテキスト", "emoji 🎉🎉 and 'quotes'"]:
        assert model.tokenizer.encode(text, add_special_tokens=False) == encoding.encode(text, allowed_special=set())


def test_a_reply_streams_its_channels_and_ends_at_return(scripted):
    model, network = scripted
    pieces = list(model.stream_messages(MESSAGES, 100, Sampling(temperature=0)))
    channels = [channel for channel, _ in pieces]
    assert channels.index("final") > 0 and set(channels[:channels.index("final")]) == {"analysis"}
    assert "".join(text for channel, text in pieces if channel == "analysis") == "The user greets. Answer kindly."
    assert "".join(text for channel, text in pieces if channel == "final") == "Hello there!"
    network.prompt_end = None
    session = Session()
    assert model.generate(MESSAGES, 100, Sampling(temperature=0)) == "Hello there!"
    network.prompt_end = None
    assert "".join(model.stream(MESSAGES, 100, Sampling(temperature=0), session=session)) == "Hello there!"
    assert session.finish_reason == "stop"  # at <|return|>, not at the analysis' <|end|>


def test_the_cli_shows_the_reasoning_apart_unless_hidden(scripted, capsys):
    model, network = scripted
    args = SimpleNamespace(n_predict=100, stop=[], reasoning_effort="low", hide_reasoning=False)
    conversation = Conversation("Be brief.")
    chat_turn(model, conversation, Session(), "Hi", args, Sampling(temperature=0))
    assert capsys.readouterr().out == "The user greets. Answer kindly.\nHello there!\n"
    assert conversation.messages[-1] == {"role": "assistant", "content": "Hello there!"}  # the answer alone
    network.prompt_end = None
    print_reply(model, conversation.all_messages(), args, Sampling(temperature=0), Session(), show_reasoning=False)
    assert capsys.readouterr().out == "Hello there!"


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Gets the weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}]
# a call as openai-harmony renders it, and as the model card shows gpt-oss saying it (the recipient after the channel)
CALL = '<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"city":"Paris"}' \
       '<|call|>'
SAID_CALL = '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>' \
            '{"city":"Paris"}<|call|>'


def test_tools_calls_and_results_are_rendered_as_harmonys_own(model):
    """Tools in the developer message beside the system prompt's instructions, a call (its content a
    commentary preamble) and its result as openai-harmony renders them by hand."""
    h = harmony
    encoding = model.harmony.encoding
    from datetime import date

    system = h.SystemContent.new().with_reasoning_effort(h.ReasoningEffort.MEDIUM) \
        .with_conversation_start_date(date.today().isoformat())
    tools = [h.ToolDescription.new("get_weather", "Gets the weather in a city.",
                                   parameters=TOOLS[0]["function"]["parameters"])]
    call = h.Message.from_role_and_content(h.Role.ASSISTANT, '{"city":"Paris"}').with_channel("commentary") \
        .with_recipient("functions.get_weather").with_content_type("<|constrain|>json")
    expected = encoding.render_conversation_for_completion(h.Conversation.from_messages([
        h.Message.from_role_and_content(h.Role.SYSTEM, system),
        h.Message.from_role_and_content(h.Role.DEVELOPER, h.DeveloperContent.new().with_instructions("Be brief.")
                                        .with_function_tools(tools)),
        h.Message.from_role_and_content(h.Role.USER, "Weather in Paris?"),
        h.Message.from_role_and_content(h.Role.ASSISTANT, "Checking.").with_channel("commentary"),
        call,
        h.Message.from_author_and_content(h.Author.new(h.Role.TOOL, "functions.get_weather"), '{"temp_c": 21}')
        .with_recipient("assistant").with_channel("commentary"),
    ]), h.Role.ASSISTANT)
    assert model.harmony.render(TOOL_MESSAGES, tools=TOOLS) == expected
    text = encoding.decode(expected)
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text
    assert "# Instructions\n\nBe brief.\n\n# Tools\n\n## functions\n\nnamespace functions {\n\n" \
           "// Gets the weather in a city.\ntype get_weather = (_: {\ncity: string,\n}) => any;" in text
    assert CALL in text and '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>' in text
    assert encoding.decode(encoding.render(call)) == CALL
    # without a system prompt the tools have a developer message of their own; without tools, none is added
    alone = model.tokenizer.decode(model.harmony.render(TOOL_MESSAGES[1:2], tools=TOOLS))
    assert "<|end|><|start|>developer<|message|># Tools\n\n## functions" in alone
    assert model.harmony.render(MESSAGES, tools=[]) == model.harmony.render(MESSAGES)


@pytest.mark.parametrize("call", [CALL, SAID_CALL], ids=["as-rendered", "as-said"])
def test_a_tool_call_streams_apart_from_the_answer_and_ends_the_reply(model, monkeypatch, call):
    """A reply's call: its arguments stream as "tool_call" to functions.get_weather, never as the answer, it is
    parsed into (name, arguments), and the reply stops at its <|call|>."""
    reply = "<|channel|>analysis<|message|>Need weather.<|end|>" + call
    assert model.tokenizer.encode(reply, add_special_tokens=False) == \
        model.harmony.encoding.encode(reply, allowed_special="all")
    network = say(model, monkeypatch, reply)
    parser, session, pieces = model.harmony.parser(), Session(), []
    for token in model.generate_ids(model.harmony.render(TOOL_MESSAGES[:2], tools=TOOLS), 100,
                                    Sampling(temperature=0), session):
        piece = parser.push(token)
        if piece is not None:
            pieces.append((*piece, parser.recipient))
    assert "".join(text for channel, text, _ in pieces if channel == "analysis") == "Need weather."
    assert "".join(text for channel, text, _ in pieces if channel == "tool_call") == '{"city":"Paris"}'
    assert {(channel, recipient) for channel, _, recipient in pieces} == \
        {("analysis", None), ("tool_call", "functions.get_weather")}
    assert parser.tool_calls() == [("get_weather", '{"city":"Paris"}')]
    assert session.finish_reason == "stop"  # at <|call|>: the script has nothing after it
    parser.push(model.tokenizer.backend.token_to_id("<|call|>"))  # a caller that pushes the stop too
    assert parser.tool_calls() == [("get_weather", '{"city":"Paris"}')]
    network.prompt_end = None
    assert model.generate(TOOL_MESSAGES[:2], 100, Sampling(temperature=0)) == ""  # no answer: the call is not one


def test_a_commentary_preamble_is_commentary_not_a_call(model, monkeypatch):
    """Commentary to no one (a preamble gpt-oss says to the user) streams as "commentary"."""
    say(model, monkeypatch, "<|channel|>commentary<|message|>Checking the weather.<|end|>" + SAID_CALL)
    parser = model.harmony.parser()
    pieces = [piece for token in model.generate_ids(model.harmony.render(TOOL_MESSAGES[:2], tools=TOOLS), 100,
                                                    Sampling(temperature=0)) if (piece := parser.push(token))]
    assert "".join(text for channel, text in pieces if channel == "commentary") == "Checking the weather."
    assert parser.tool_calls() == [("get_weather", '{"city":"Paris"}')]


CALL_1 = TOOL_MESSAGES[2]


@pytest.mark.parametrize("messages, tools, error", [
    ([{"content": "Hi"}], None, r"messages\[0\]: a harmony conversation has no role None"),
    (["Hi"], None, "has no role None"),
    ([{"role": "robot", "content": "Hi"}], None, "has no role 'robot'"),
    ([{"role": "user"}], None, r"messages\[0\]: a user message's content must be a string .* not NoneType"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], None,
     "only text content is supported"),
    ([{"role": "assistant", "tool_calls": "get_weather(Paris)"}], None, "tool_calls must be a list"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "get_weather"}}]}], None,
     r"tool_calls\[0\] must be .*its arguments a string"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "get weather", "arguments": "{}"}}]}],
     None, "its name of letters"),
    ([CALL_1, {"role": "tool", "tool_call_id": "call_9", "content": "21"}], None,
     r"messages\[1\]: a tool result for tool call 'call_9', which no earlier"),
    ([{"role": "user", "content": "Hi"}], {"type": "function"}, "tools must be a list"),
    ([{"role": "user", "content": "Hi"}], [{"name": "get_weather", "parameters": {}}], r"tools\[0\] must be"),
    ([{"role": "user", "content": "Hi"}], [{"type": "function", "function": {"name": "f", "parameters": "x"}}],
     r"tools\[0\] must be"),
])
def test_malformed_messages_and_tools_are_refused_in_a_line(model, messages, tools, error):
    with pytest.raises(TrillmError, match=error) as refused:
        model.harmony.render(messages, tools=tools)
    assert "\n" not in str(refused.value)


def test_what_is_not_malformed(model):
    """Arguments that are not JSON pass through as the text they are, and a call needs no content."""
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "Paris, please"}}]}
    text = model.tokenizer.decode(model.harmony.render([{"role": "developer", "content": "Be brief."}, call]))
    assert "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>" \
           "Paris, please<|call|>" in text and "# Instructions\n\nBe brief." in text


def test_o200k_base_comes_from_the_models_vocabulary(model, tmp_path):
    write_o200k_base(model.tokenizer, tmp_path / "o200k_base.tiktoken", "model")
    assert (tmp_path / "o200k_base.tiktoken").stat().st_size > 2_000_000
    other = trillm.load(None).tokenizer  # SmolLM2's vocabulary is not o200k_harmony
    with pytest.raises(CheckpointError, match="not gpt-oss's o200k_harmony"):
        write_o200k_base(other, tmp_path / "other.tiktoken", "smollm2")
