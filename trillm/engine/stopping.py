"""Where generated text stops: stop strings (held back while they could still be forming) and the text
pieces a stream prints, whole UTF-8 characters only."""

from collections.abc import Iterator

from trillm.tokenizer import StreamDecoder


def find_stop(text: str, stop_strings: list[str]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    # An empty stop string would match everywhere and stop before the first word.
    starts = [start for stop in stop_strings if stop and (start := text.find(stop)) != -1]
    return min(starts, default=None)


def safe_prefix_len(text: str, stop_strings: list[str]) -> int:
    """How much of `text` can be printed now while streaming.

    Printing stops before a complete stop string, and before a tail of `text` that could still grow into
    one (its start: "<|im_" when "<|im_end|>" is a stop string), since printed text cannot be taken back.
    """
    stop_start = find_stop(text, stop_strings)
    if stop_start is not None:
        return stop_start
    held_back = 0
    for stop in stop_strings:
        # The longest tail of `text` that is a beginning of `stop`; a whole `stop` was ruled out above.
        for length in range(min(len(stop) - 1, len(text)), held_back, -1):
            if text.endswith(stop[:length]):
                held_back = length
                break
    return len(text) - held_back


def decoded_pieces(tokenizer, token_ids: Iterator[int]) -> Iterator[str]:
    """Generated ids as text pieces of whole UTF-8 characters; closing this closes token_ids."""
    decoder = StreamDecoder(tokenizer)
    try:
        for token in token_ids:
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail
    finally:
        token_ids.close()


def cut_at_stop(pieces: Iterator[str], stop_strings: list[str] = ()) -> Iterator[str]:
    """Text pieces up to the first stop string (left out), which ends the source (it is closed).

    Text that could be the start of a stop string is held back until it is clearly not one.
    """
    held = ""
    try:
        for piece in pieces:
            held += piece
            stop_at = find_stop(held, stop_strings)
            if stop_at is not None:
                if stop_at:
                    yield held[:stop_at]
                return
            ready = safe_prefix_len(held, stop_strings)
            if ready:
                yield held[:ready]
                held = held[ready:]
        if held:
            yield held
    finally:
        pieces.close()


def stream_text(tokenizer, token_ids: Iterator[int], stop_strings: list[str] = ()) -> Iterator[str]:
    """Turn generated ids into printable text pieces: whole UTF-8 characters only, stop strings cut off."""
    return cut_at_stop(decoded_pieces(tokenizer, token_ids), stop_strings)
