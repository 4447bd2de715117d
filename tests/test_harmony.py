"""gpt-oss's harmony chat: prompts as openai-harmony renders them (the chat's system prompt as developer
instructions, the reasoning effort, earlier replies by their answers), replies parsed into the analysis and
final channels, <|return|> ending a reply and <|end|> not, the o200k_base file written from the model's own
vocabulary, and the CLI showing the reasoning apart from the answer."""

from types import SimpleNamespace

import pytest
import torch

import trillm
from trillm.cli import chat_turn, print_reply
from trillm.chat import Conversation
from trillm.engine import Sampling, Session
from trillm.errors import CheckpointError
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


@pytest.fixture
def scripted(model, monkeypatch):
    script = model.tokenizer.encode(REPLY, add_special_tokens=False)
    network = ScriptedNetwork(model.network, script)
    monkeypatch.setattr(model, "network", network)
    return model, network


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


def test_o200k_base_comes_from_the_models_vocabulary(model, tmp_path):
    write_o200k_base(model.tokenizer, tmp_path / "o200k_base.tiktoken", "model")
    assert (tmp_path / "o200k_base.tiktoken").stat().st_size > 2_000_000
    other = trillm.load(None).tokenizer  # SmolLM2's vocabulary is not o200k_harmony
    with pytest.raises(CheckpointError, match="not gpt-oss's o200k_harmony"):
        write_o200k_base(other, tmp_path / "other.tiktoken", "smollm2")
