"""Chat templates: turn a conversation into the prompt text a chat model was trained on.

Follows transformers' `tokenizer.apply_chat_template(messages, tokenize=False)` (transformers 5,
utils/chat_template_utils.py and tokenization_utils_base.py): the same sandboxed jinja2 environment, the
same helpers and the same variables, so a template from the Hub or from GGUF metadata gives here the very
text it gives there.
"""
import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from trillm.errors import TrillmError

# The named special tokens transformers hands to every template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(TrillmError, ValueError):
    """A conversation that cannot be rendered: no template, a broken one, or one that rejects the messages.
    A ValueError for callers of the library; a TrillmError so the CLI prints it as one line."""


NO_TEMPLATE_MESSAGE = (
    "this model has no chat template, so a conversation cannot be formatted for it; "
    "use --raw to send your text to the model as it is"
)


def raise_exception(message):
    """What a template calls to reject a conversation, e.g. roles that do not alternate."""
    raise jinja2.exceptions.TemplateError(message)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """JSON as templates expect it (transformers' override): jinja2's own `tojson` escapes <, >, & and '
    for HTML and sorts the keys, which would change the tool schemas a model was trained on."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    """Today's date for templates that write it into the system prompt (Llama 3.x)."""
    return datetime.now().strftime(format)


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to find the assistant's tokens for
    training masks. Rendering only needs the body, unchanged, but without the tag such templates would not
    even compile."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("render_body"), [], [], body).set_lineno(lineno)

    def render_body(self, caller):
        return caller()


def make_environment() -> ImmutableSandboxedEnvironment:
    # Templates are untrusted code (they ship inside model files), hence the immutable sandbox.
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment


TEMPLATE_ENVIRONMENT = make_environment()


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """Parse once; a chat renders the same template again at every turn."""
    return TEMPLATE_ENVIRONMENT.from_string(template)


def render_chat(template: str | None, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None, **extra) -> str:
    """The prompt text for `messages` ({"role", "content"} dicts), exactly as transformers renders it.

    `extra` reaches the template as variables: the other special tokens (unk_token, pad_token...) and
    template options such as tools, documents or date_string.
    """
    # transformers 5 has no default template either; an empty one would render an empty prompt.
    if not template:
        raise ChatTemplateError(NO_TEMPLATE_MESSAGE)
    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation")
    special_tokens = {"bos_token": bos_token, "eos_token": eos_token}
    special_tokens.update((name, extra.pop(name)) for name in SPECIAL_TOKEN_NAMES if name in extra)
    variables = {
        "tools": None,
        "documents": None,
        # A token the model lacks stays undefined, as in transformers, rather than rendering as "None".
        **{name: token for name, token in special_tokens.items() if token is not None},
        **extra,
    }
    # Keys set to None are dropped, as transformers does: templates test `'tool_calls' in message`.
    messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
    try:
        compiled = compile_template(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as error:  # syntax errors, raise_exception, undefined names, sandbox refusals
        where = f" at line {error.lineno}" if isinstance(error, jinja2.TemplateSyntaxError) else ""
        message = " ".join(str(error.message).split())  # jinja2's can span lines; the CLI prints one
        raise ChatTemplateError(f"chat template error{where}: {message}") from error


class Conversation:
    """A chat so far: an optional system prompt, then the user's and the assistant's turns."""

    def __init__(self, system_prompt: str | None = None):
        self.system_prompt = system_prompt
        self.messages: list[dict] = []

    def add_user(self, text: str):
        self.messages.append({"role": "user", "content": text})

    def add_assistant(self, text: str):
        self.messages.append({"role": "assistant", "content": text})

    def reset(self):
        """Forget the turns; the system prompt stays."""
        self.messages.clear()

    def all_messages(self) -> list[dict]:
        """The system prompt (if any), then the turns."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.messages
