"""Harmony, gpt-oss's chat format, through OpenAI's own openai-harmony library: conversations rendered to
token ids, and replies parsed back into their channels as they stream ("analysis", the model's reasoning,
then "final", the answer).

As the release's chat template does, the system message carries the reasoning effort and today's date, and
a conversation's own system prompt becomes the developer message's instructions; earlier replies enter the
history by their final answers alone (harmony drops earlier analysis). A reply ends at <|return|> or
<|call|>, not at <|end|>, which only closes its analysis message.

openai-harmony reads the o200k_base vocabulary from a tiktoken file, which it would download; trillm
writes that file from the model's own tokenizer (o200k_harmony holds o200k_base) into its cache, checked
against the digest openai-harmony expects.
"""

import base64
import hashlib
import os
from datetime import date
from pathlib import Path

from trillm.errors import CheckpointError, TrillmError

REASONING_EFFORTS = ("low", "medium", "high")
O200K_BASE_RANKS = 199998
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


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

    def render(self, messages: list[dict], reasoning_effort: str = "medium") -> list[int]:
        """Token ids of a conversation ({"role", "content"} dicts: system, user, assistant), ready for the
        assistant's next reply."""
        h = self.harmony
        if reasoning_effort not in REASONING_EFFORTS:
            raise TrillmError(f"invalid reasoning effort {reasoning_effort!r} (choose from {', '.join(REASONING_EFFORTS)})")
        system = h.SystemContent.new().with_reasoning_effort(h.ReasoningEffort(reasoning_effort.capitalize())) \
            .with_conversation_start_date(date.today().isoformat())
        rendered = [h.Message.from_role_and_content(h.Role.SYSTEM, system)]
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system":
                rendered.append(h.Message.from_role_and_content(
                    h.Role.DEVELOPER, h.DeveloperContent.new().with_instructions(content)))
            elif role == "user":
                rendered.append(h.Message.from_role_and_content(h.Role.USER, content))
            elif role == "assistant":
                rendered.append(h.Message.from_role_and_content(h.Role.ASSISTANT, content).with_channel("final"))
            else:
                raise TrillmError(f"a harmony conversation has no role {role!r} (system, user, assistant)")
        return self.encoding.render_conversation_for_completion(h.Conversation.from_messages(rendered),
                                                                h.Role.ASSISTANT)

    def parser(self) -> "ReplyParser":
        return ReplyParser(self.harmony.StreamableParser(self.encoding, role=self.harmony.Role.ASSISTANT))


class ReplyParser:
    """Tokens of a reply in, (channel, text) pieces out, as they complete."""

    def __init__(self, parser):
        self.parser = parser

    def push(self, token: int) -> tuple[str, str] | None:
        self.parser.process(token)
        delta = self.parser.last_content_delta
        return (self.parser.current_channel or "final", delta) if delta else None


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
