"""Generation: sampling.py (how a token is picked), stopping.py (stop strings, text streaming), session.py
(a sequence's cache and tokens), generate.py (prefill, decode_one_token, generate_ids)."""

from trillm.engine.generate import decode_one_token, generate_ids, prefill
from trillm.engine.sampling import GREEDY, Sampling, sample_next
from trillm.engine.session import Session
from trillm.engine.stopping import stream_text

__all__ = ["GREEDY", "Sampling", "Session", "decode_one_token", "generate_ids", "prefill", "sample_next",
           "stream_text"]
