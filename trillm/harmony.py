"""Harmony, gpt-oss's chat format, through OpenAI's own openai-harmony library: conversations rendered to
token ids, and replies parsed back into their channels as they stream ("analysis", the model's reasoning,
then "final", the answer).

As the release's chat template does, the system message carries the reasoning effort and today's date, and
a conversation's own system prompt becomes the developer message's instructions; earlier replies enter the
history by their final answers alone (harmony drops earlier analysis). A reply ends at <|return|> or
<|call|>, not at <|end|>, which only closes its analysis message.

Function tools are OpenAI's chat-completions ones: offered in the developer message, an assistant's calls
rendered as harmony's messages to "functions.NAME" on the commentary channel, and their results as messages
from "functions.NAME"; a reply's call is parsed back by the recipient its message is to.

openai-harmony reads the o200k_base vocabulary from a tiktoken file, which it would download; trillm
writes that file from the model's own tokenizer (o200k_harmony holds o200k_base) into its cache, checked
against the digest openai-harmony expects.
"""

import base64
import hashlib
import os
import re
from datetime import date
from pathlib import Path

from trillm.chat import message_text
from trillm.errors import CheckpointError, TrillmError

REASONING_EFFORTS = ("low", "medium", "high")
O200K_BASE_RANKS = 199998
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# OpenAI's rule for function names; harmony writes them bare in a header ("to=functions.NAME"), where a space
# or a special token would change what the header says.
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
CALL_SHAPE = '{"id", "type": "function", "function": {"name", "arguments"}}'
TOOL_SHAPE = '{"type": "function", "function": {"name", "description", "parameters"}}'


class Harmony:
    """The harmony encoding for a model's tokenizer: render(messages) -> prompt ids; parser() -> a
    ReplyParser; stop_ids: the tokens that end a reply."""

    def __init__(self, tokenizer, source):
        try:
            import openai_harmony
        except ImportError:
            raise TrillmError("gpt-oss needs openai-harmony for its chat format: pip install openai-harmony") from None
        folder = Path(os.environ.get("TIKTOKEN_ENCODINGS_BASE") or tiktoken_folder())
        if not (folder / "o200k_base.tiktoken").is_file():
            write_o200k_base(tokenizer, folder / "o200k_base.tiktoken", source)
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
        try:
            self.encoding = openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
        except openai_harmony.HarmonyError as error:
            raise TrillmError(f"openai-harmony cannot load its encoding ({error}); the o200k_base.tiktoken in "
                              f"{folder} may be damaged: delete it to have it written again") from None
        self.harmony = openai_harmony
        self.stop_ids = set(self.encoding.stop_tokens_for_assistant_actions())

    def render(self, messages: list[dict], reasoning_effort: str = "medium", tools: list[dict] | None = None) \
            -> list[int]:
        """Token ids of an OpenAI chat-completions conversation (roles system or developer, user, assistant
        with its tool_calls, tool with a call's result), offering the function `tools`, ready for the
        assistant's next reply. A malformed message is a TrillmError."""
        h = self.harmony
        if reasoning_effort not in REASONING_EFFORTS:
            raise TrillmError(f"invalid reasoning effort {reasoning_effort!r} (choose from {', '.join(REASONING_EFFORTS)})")
        system = h.SystemContent.new().with_reasoning_effort(h.ReasoningEffort(reasoning_effort.capitalize())) \
            .with_conversation_start_date(date.today().isoformat())
        rendered = [h.Message.from_role_and_content(h.Role.SYSTEM, system)]
        call_names = {}  # a tool call's id -> its function's name, which signs the call's result
        for index, message in enumerate(messages):
            where = f"messages[{index}]"
            role = message.get("role") if isinstance(message, dict) else None
            if role in ("system", "developer"):
                rendered.append(h.Message.from_role_and_content(
                    h.Role.DEVELOPER, h.DeveloperContent.new().with_instructions(message_text(message, where))))
            elif role == "user":
                rendered.append(h.Message.from_role_and_content(h.Role.USER, message_text(message, where)))
            elif role == "assistant" and message.get("tool_calls"):
                rendered += call_messages(h, message, where, call_names)
            elif role == "assistant":
                rendered.append(h.Message.from_role_and_content(h.Role.ASSISTANT, message_text(message, where))
                                .with_channel("final"))
            elif role == "tool":
                call_id = message.get("tool_call_id")
                if not isinstance(call_id, str) or call_id not in call_names:
                    raise TrillmError(f"{where}: a tool result for tool call {call_id!r}, which no earlier assistant "
                                      f"message made")
                author = h.Author.new(h.Role.TOOL, f"functions.{call_names[call_id]}")
                rendered.append(h.Message.from_author_and_content(author, message_text(message, where))
                                .with_recipient("assistant").with_channel("commentary"))
            else:
                raise TrillmError(f"{where}: a harmony conversation has no role {role!r} "
                                  f"(system, developer, user, assistant, tool)")
        if tools:
            # One developer message: the tools join the conversation's opening system prompt, if it has one.
            # openai-harmony then has the system message send their calls to the commentary channel.
            descriptions = tool_descriptions(h, tools)
            if len(rendered) > 1 and rendered[1].author.role == h.Role.DEVELOPER:
                rendered[1].content[0].with_function_tools(descriptions)
            else:
                rendered.insert(1, h.Message.from_role_and_content(
                    h.Role.DEVELOPER, h.DeveloperContent.new().with_function_tools(descriptions)))
        return self.encoding.render_conversation_for_completion(h.Conversation.from_messages(rendered),
                                                                h.Role.ASSISTANT)

    def parser(self) -> "ReplyParser":
        return ReplyParser(self.harmony.StreamableParser(self.encoding, role=self.harmony.Role.ASSISTANT))


class ReplyParser:
    """Tokens of a reply in, (channel, text) pieces out, as they complete: "analysis", "commentary" (a
    preamble to the user), "final", and "tool_call" for the text of a message to a recipient (a call's
    arguments, to `recipient`), which is never the answer. tool_calls(): the calls the reply made (a reply with
    one ends at its <|call|>)."""

    def __init__(self, parser):
        self.parser = parser

    def push(self, token: int) -> tuple[str, str] | None:
        self.parser.process(token)
        delta = self.parser.last_content_delta
        if not delta:
            return None
        return ("tool_call" if self.parser.current_recipient else self.parser.current_channel or "final"), delta

    @property
    def recipient(self) -> str | None:
        """The recipient of the message being parsed: "functions.NAME" while a call's arguments stream."""
        return self.parser.current_recipient

    def tool_calls(self) -> list[tuple[str, str]]:
        """The reply's function calls, as (name, arguments JSON text): its messages to "functions.NAME", the
        one being parsed last too, for the reply's stop (<|call|>) ends it whether or not it was pushed
        (generate_ids does not yield it); a reply cut short (finish_reason "length") may have cut that one
        short. Any channel counts: harmony names a call by its recipient."""
        said = [(message.recipient, "".join(part.text for part in message.content)) for message in self.parser.messages]
        said.append((self.parser.current_recipient, self.parser.current_content))
        return [(recipient.removeprefix("functions."), text) for recipient, text in said
                if (recipient or "").startswith("functions.")]


def call_messages(h, message: dict, where: str, call_names: dict) -> list:
    """An assistant message's tool calls as harmony's calls, each to its function on the commentary channel,
    its arguments constrained to JSON, their names noted in call_names by id. Content beside them is a
    preamble, which harmony says on the commentary channel too (the final channel would end the turn)."""
    content = message_text(message, where, required=False)
    rendered = [h.Message.from_role_and_content(h.Role.ASSISTANT, content).with_channel("commentary")] \
        if content else []
    calls = message["tool_calls"]
    if not isinstance(calls, list):
        raise TrillmError(f"{where}: tool_calls must be a list of {CALL_SHAPE}")
    for index, call in enumerate(calls):
        is_function = isinstance(call, dict) and call.get("type", "function") == "function"
        function = call.get("function") if is_function else None
        if not (isinstance(function, dict) and isinstance(call.get("id"), str) and isinstance(function.get("name"), str)
                and FUNCTION_NAME.fullmatch(function["name"]) and isinstance(function.get("arguments"), str)):
            raise TrillmError(f"{where}: tool_calls[{index}] must be {CALL_SHAPE}, its name of letters, digits, _ "
                              f"and -, its arguments a string")
        call_names[call["id"]] = function["name"]
        rendered.append(h.Message.from_role_and_content(h.Role.ASSISTANT, function["arguments"])
                        .with_channel("commentary").with_recipient(f"functions.{function['name']}")
                        .with_content_type("<|constrain|>json"))
    return rendered


def tool_descriptions(h, tools: list[dict]) -> list:
    """OpenAI's function tools as harmony's ToolDescriptions (no parameters: a function of none)."""
    if not isinstance(tools, list):
        raise TrillmError(f"tools must be a list of {TOOL_SHAPE}")
    descriptions = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and FUNCTION_NAME.fullmatch(function["name"]) and isinstance(function.get("description") or "", str)
                and isinstance(function.get("parameters", {}), (dict, type(None)))):
            raise TrillmError(f"tools[{index}] must be {TOOL_SHAPE}, its name of letters, digits, _ and -")
        descriptions.append(h.ToolDescription.new(function["name"], function.get("description") or "",
                                                  parameters=function.get("parameters")))
    return descriptions


def tiktoken_folder() -> Path:
    from trillm.native.build import cache_dir

    return cache_dir().parent / "tiktoken"


def write_o200k_base(tokenizer, path: Path, source):
    """o200k_base.tiktoken (`base64(token) rank` lines) from the first 199998 entries of the model's
    vocabulary, which are o200k_base's in o200k_harmony; refused unless it has the digest openai-harmony
    expects."""
    from trillm.tokenizer import _gpt2_byte_spelling

    bytes_of = {spelled: byte for byte, spelled in _gpt2_byte_spelling().items()}
    pieces = {token_id: piece for piece, token_id in tokenizer.backend.get_vocab(with_added_tokens=False).items()
              if token_id < O200K_BASE_RANKS}
    try:
        lines = [base64.b64encode(bytes(bytes_of[char] for char in pieces[rank])) + b" %d\n" % rank
                 for rank in range(O200K_BASE_RANKS)]
    except KeyError:
        lines = []
    data = b"".join(lines)
    if hashlib.sha256(data).hexdigest() != O200K_BASE_SHA256:
        raise CheckpointError(f"{source}: the tokenizer's vocabulary is not gpt-oss's o200k_harmony, so harmony "
                              f"cannot render for it (or put o200k_base.tiktoken in a folder named by "
                              f"TIKTOKEN_ENCODINGS_BASE)")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
