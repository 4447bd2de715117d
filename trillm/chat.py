"""Chat templates: turn a conversation into the prompt text a chat model was trained on.

Follows transformers' `tokenizer.apply_chat_template(messages, tokenize=False)` (transformers 5,
utils/chat_template_utils.py and tokenization_utils_base.py): the same sandboxed jinja2 environment, the
same helpers and the same variables, so a template from the Hub or from GGUF metadata gives here the very
text it gives there.
"""
import functools
import json
import re
import resource
import string
import sys
import time
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from trillm.errors import TrillmError

# A template is code from a model file, and may try to loop for hours or build gigabytes; a real chat
# template renders in milliseconds to some kilobytes. What rendering may take:
MAX_PROMPT_CHARS = 4 * 2**20  # the rendered prompt: more text than any model's context holds
MAX_TEMPLATE_NUMBER = 100_000  # an integer given to a filter, a method or a format width (jinja's own range() cap)
MAX_RENDER_SECONDS = 10.0
MAX_RENDER_GROWTH_BYTES = 2**30  # how much the process's peak memory may grow while rendering

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


def check_numbers(values):
    """Refuse integers larger than a template needs: widths, counts, indents of millions are bombs."""
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_TEMPLATE_NUMBER:
            raise SecurityError(f"the number {value} is larger than a chat template may use ({MAX_TEMPLATE_NUMBER})")


def check_format_string(text: str):
    """Refuse format specs with huge widths or precisions ('{0:>3000000000}', '%3000000000s')."""
    specs = [spec or "" for _, _, spec, _ in string.Formatter().parse(text)]
    check_numbers(int(number) for spec in specs for number in re.findall(r"\d+", spec))


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox (templates are untrusted code: they ship inside model files) with limits on
    what one operation may build: sequences repeated or joined past MAX_PROMPT_CHARS, powers past a few
    thousand bits, and huge numbers handed to calls, filters and format specs are refused."""

    intercepted_binops = frozenset(["*", "+", "**", "%"])

    def call_binop(self, context, operator, left, right):
        sized = (str, list, tuple)
        if operator == "*" and isinstance(left, int) and isinstance(right, sized):
            left, right = right, left
        if operator == "*" and isinstance(left, sized) and isinstance(right, int) and len(left) * right > MAX_PROMPT_CHARS:
            raise SecurityError(f"a chat template may not build sequences longer than {MAX_PROMPT_CHARS}")
        if operator == "+" and isinstance(left, sized) and isinstance(right, sized) and \
                len(left) + len(right) > MAX_PROMPT_CHARS:
            raise SecurityError(f"a chat template may not build sequences longer than {MAX_PROMPT_CHARS}")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                right * max(abs(left), 2).bit_length() > 4096:
            raise SecurityError(f"{left} ** {right} is larger than a chat template may compute")
        if operator == "%" and isinstance(left, str):  # printf-style: widths and precisions, and "*" ones
            check_numbers(int(number) for spec in re.findall(r"%(?:\([^)]*\))?[-+ #0]*(\d*)(?:\.(\d*))?", left)
                          for number in spec if number)
            if "*" in left:
                check_numbers(right if isinstance(right, tuple) else (right,))
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own argument names)
        check_numbers((*args, *kwargs.values()))
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value):
        formatter = super().wrap_str_format(value)
        if formatter is None:
            return None

        def checked(*args, **kwargs):
            check_format_string(value.__self__)
            check_numbers((*args, *kwargs.values()))
            return formatter(*args, **kwargs)

        return functools.update_wrapper(checked, formatter)


def bounded_filter(function):
    """A filter whose arguments (after the value filtered, and the context jinja passes some) are checked."""
    leading = 2 if getattr(function, "jinja_pass_arg", None) else 1

    @functools.wraps(function)
    def checked(*args, **kwargs):
        check_numbers((*args[leading:], *kwargs.values()))
        return function(*args, **kwargs)

    return checked


def make_environment() -> ImmutableSandboxedEnvironment:
    environment = BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                                 extensions=[GenerationTag, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.filters = {name: bounded_filter(function) for name, function in environment.filters.items()}
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment


class RenderBudget:
    """Stops a render that runs past MAX_RENDER_SECONDS or grows the process's peak memory by more than
    MAX_RENDER_GROWTH_BYTES. A compiled template is Python code, so a trace function sees every line it
    runs, loops included (the sandbox cannot: a loop over a list calls nothing it could check)."""

    def __init__(self):
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS
        self.peak_limit = peak_memory() + MAX_RENDER_GROWTH_BYTES
        self.lines = 0

    def trace(self, frame, event, arg):
        self.lines += 1
        if self.lines % 32 == 0:
            if time.monotonic() > self.deadline:
                raise ChatTemplateError(f"the chat template ran for more than {MAX_RENDER_SECONDS:g} s; it was stopped")
            if peak_memory() > self.peak_limit:
                raise ChatTemplateError(f"the chat template took more than {MAX_RENDER_GROWTH_BYTES >> 20} MB of "
                                        f"memory; it was stopped")
        return self.trace

    def render(self, template: jinja2.Template, variables: dict) -> str:
        """The whole text, or ChatTemplateError past the budget or past MAX_PROMPT_CHARS of output."""
        pieces, length = [], 0
        previous = sys.gettrace()
        sys.settrace(self.trace)
        try:
            for piece in template.generate(**variables):
                length += len(piece)
                if length > MAX_PROMPT_CHARS:
                    raise ChatTemplateError(f"the chat template wrote more than {MAX_PROMPT_CHARS} characters; it "
                                            f"was stopped")
                pieces.append(piece)
        finally:
            sys.settrace(previous)
        return "".join(pieces)


def peak_memory() -> int:
    """The process's peak resident memory in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


TEMPLATE_ENVIRONMENT = make_environment()


@functools.lru_cache(maxsize=16)
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
        return RenderBudget().render(compiled, dict(messages=messages, add_generation_prompt=add_generation_prompt,
                                                    **variables))
    except jinja2.TemplateError as error:  # syntax errors, raise_exception, undefined names, sandbox refusals
        where = f" at line {error.lineno}" if isinstance(error, jinja2.TemplateSyntaxError) else ""
        message = " ".join(str(error.message).split())  # jinja2's can span lines; the CLI prints one
        raise ChatTemplateError(f"chat template error{where}: {message}") from error


def message_text(message: dict, where: str, required: bool = True) -> str:
    """An OpenAI chat message's content: a string, or its list of text parts, joined; `where` names the
    message in an error."""
    content = message.get("content")
    if content is None and not required:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                   for part in content):
            raise TrillmError(f'{where}: only text content is supported (a string, or {{"type": "text", "text"}} '
                              f'parts)')
        return "".join(part["text"] for part in content)
    raise TrillmError(f"{where}: a {message['role']} message's content must be a string or a list of text parts, "
                      f"not {type(content).__name__}")


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

    def drop_oldest_turns(self, fits) -> int:
        """Drop the oldest messages (a user's and the reply to it together) until fits(all_messages()) or
        only the newest message is left; return how many were dropped. The system prompt stays."""
        dropped = 0
        while len(self.messages) > 1 and not fits(self.all_messages()):
            count = 2 if len(self.messages) > 2 and self.messages[1]["role"] == "assistant" else 1
            del self.messages[:count]
            dropped += count
        return dropped

    def all_messages(self, since: int = 0) -> list[dict]:
        """The system prompt (if any), then the turns (from turn `since` on)."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.messages[since:]
