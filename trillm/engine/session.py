"""A sequence's state between calls: its KV cache and the token ids the cache holds."""

from dataclasses import dataclass, field


@dataclass
class Session:
    """A KV cache and the token ids it holds, carried across calls (a chat's history): a new prompt only
    runs what follows the longest prefix it shares with `tokens`."""

    cache: object = None
    tokens: list[int] = field(default_factory=list)
    # (the cache it was recorded over, the decode plan or None where the steps cannot be one): see
    # generate.decode_one_token
    plan: tuple | None = None
    # Why the last generation ended: "stop" (a stop token or string), "length" (max_new_tokens), or
    # "context" (the context is full); None while it runs.
    finish_reason: str | None = None

    def keep_common_prefix(self, prompt_ids: list[int]) -> int:
        """Forget the cached tokens after the longest prefix shared with the prompt, but for at least the
        prompt's last token (it must run again for its logits); return how many are kept. None are where a
        sliding-window layer's ring no longer holds the window before the prefix's end."""
        kept = 0
        for cached, new in zip(self.tokens, prompt_ids[:-1]):
            if cached != new:
                break
            kept += 1
        # A ring of `slots` holds only the last `slots` positions written (models/layers.py:
        # KVCache.update_window). Once the forgotten positions after `kept` (which the prompt writes again)
        # reach `slots`, they have overwritten part of the window before `kept` that the prompt reads: only
        # running the whole prompt again brings those keys back.
        windows = getattr(self.cache, "windows", None) or []
        rings = [keys.shape[2] for keys, window in zip(getattr(self.cache, "keys", []), windows) if window is not None]
        if rings and len(self.tokens) - 1 >= max(kept + 1, min(rings)):
            kept = 0
        del self.tokens[kept:]
        return kept
