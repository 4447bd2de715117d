"""Continuous batching (Yu et al., 2022, "Orca"): every running sequence advances by one token in one batched
forward a step, and a new request's prompt runs between two steps instead of waiting for the batch to end.

Three small parts: a `Sequence` (one completion: its slot, sampling and reply text), the `Scheduler` (a
bounded queue, the slots, the loop on its own thread) and the model, which runs a decode step of several
sequences as one forward (models/layers.py: Transformer.forward with per-row caches and positions). Each
slot is one row of a batched KV cache with the tokens it holds, so a request that continues an earlier
conversation only runs what is new (the slot that shares the longest prefix with it is picked).
"""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from trillm.engine import Sampling, Session
from trillm.engine.generate import decode_one_token, new_cache, prefill, torch_threads
from trillm.engine.sampling import sample_next
from trillm.engine.stopping import find_stop, safe_prefix_len
from trillm.errors import TrillmError
from trillm.tokenizer import StreamDecoder
from trillm.weights.linear import KERNEL_MAX_TOKENS

log = logging.getLogger("trillm.server")

# Sequences a decode step runs together: up to the kernels' own token loops, whose arithmetic for a row does
# not depend on how many rows there are (beyond it, matmuls of decoded weights would round differently).
MAX_BATCH = KERNEL_MAX_TOKENS
# Prompt tokens run between two decode steps (a longer prompt runs in pieces of this many).
PROMPT_CHUNK = 256


class QueueFull(TrillmError):
    """Every slot is busy and the queue is full: the client should retry later (HTTP 503)."""


class TextReply:
    """A reply's text as its tokens arrive, as deltas {"content": text}: whole characters only, cut at the
    first stop string, and text that could still grow into one held back until it clearly does not."""

    def __init__(self, tokenizer, stop: list[str]):
        self.decoder = StreamDecoder(tokenizer)
        self.stop = stop
        self.held = ""
        self.stopped = False  # at a stop string
        self.tool_calls: list[tuple[str, str]] = []

    def push(self, token: int) -> tuple[dict, bool]:
        """The delta this token completes, and whether a stop string ended the reply."""
        return self.content(self.decoder.push(token))

    def content(self, text: str) -> tuple[dict, bool]:
        self.held += text
        stop_at = find_stop(self.held, self.stop)
        ready = safe_prefix_len(self.held, self.stop) if stop_at is None else stop_at
        out, self.held = self.held[:ready], ("" if stop_at is not None else self.held[ready:])
        self.stopped = stop_at is not None
        return ({"content": out} if out else {}), self.stopped

    def end(self, stop_token: int | None) -> dict:
        """What is left at the end (`stop_token`: the token that ended it, None at a stop string or a limit)."""
        if self.stopped:
            return {}
        delta, _ = self.content(self.decoder.flush())
        rest, self.held = self.held, ""
        if rest:
            delta["content"] = delta.get("content", "") + rest
        return delta


class HarmonyReply(TextReply):
    """gpt-oss's reply as harmony parses it: the analysis channel as {"reasoning": text}, the answer (and
    commentary preambles) as {"content": text}, tool calls collected for the end (at <|call|>)."""

    def __init__(self, harmony, tokenizer, stop: list[str]):
        super().__init__(tokenizer, stop)
        self.parser = harmony.parser()

    def push(self, token: int) -> tuple[dict, bool]:
        piece = self.parser.push(token)
        if piece is None:
            return {}, False
        channel, text = piece
        if channel == "analysis":
            return {"reasoning": text}, False
        if channel == "tool_call":  # its arguments: the whole call comes at the end
            return {}, False
        return self.content(text)

    def end(self, stop_token: int | None) -> dict:
        if stop_token is not None:
            self.parser.push(stop_token)  # closes the last message, a tool call's among them
            self.tool_calls = self.parser.tool_calls()
        rest, self.held = self.held, ""
        return {"content": rest} if rest else {}


class Sequence:
    """One completion in the making. Its handler gets events through `send` (from the scheduler's thread):
    ("delta", {"content" | "reasoning": text}), then ("end", finish_reason, tool_calls, prompt_tokens,
    completion_tokens) or ("error", message)."""

    def __init__(self, prompt_ids: list[int], max_tokens: int, sampling: Sampling, reply: TextReply,
                 send: Callable[[tuple], None], ignore_eos: bool = False):
        self.prompt_ids, self.max_tokens, self.sampling, self.reply, self.send = \
            prompt_ids, max_tokens, sampling, reply, send
        self.ignore_eos = ignore_eos  # generate max_tokens whatever the model says (benchmarks)
        self.generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        self.history = list(prompt_ids)  # for the repetition penalty
        self.generated = 0
        self.session: Session | None = None  # its slot's, while it runs
        self.pending: list[int] = []  # prompt tokens still to run
        self.next_token: int | None = None  # sampled, to be run at the next step
        self.cancelled = False  # set by the handler when its client went away

    def previous_tokens(self) -> torch.Tensor:
        if self.sampling.repetition_penalty == 1.0:
            return torch.empty(0, dtype=torch.long)
        return torch.tensor(self.history)


class Metrics:
    """What GET /metrics shows, in Prometheus' text format (prometheus_client)."""

    def __init__(self):
        disable_created_metrics()  # the *_created series say when a counter was made: noise here
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("trillm_requests", "completions (one a choice) by outcome", ["outcome"], registry=r)
        for outcome in ("completed", "cancelled", "rejected", "error"):
            self.requests.labels(outcome)  # each shown from the start, at 0
        self.prompt_tokens = Counter("trillm_prompt_tokens", "prompt tokens run (cached ones not counted)", registry=r)
        self.generated_tokens = Counter("trillm_generated_tokens", "tokens generated", registry=r)
        self.prompt_seconds = Counter("trillm_prompt_seconds", "time spent running prompts", registry=r)
        self.decode_seconds = Counter("trillm_decode_seconds", "time spent in decode steps", registry=r)
        self.prompt_rate = Gauge("trillm_prompt_tokens_per_second", "prompt tokens/s, over the server's life",
                                 registry=r)
        self.decode_rate = Gauge("trillm_decode_tokens_per_second", "generated tokens/s over decode steps, all "
                                 "sequences together, over the server's life", registry=r)
        self.queue_depth = Gauge("trillm_queue_depth", "requests waiting for a slot", registry=r)
        self.active = Gauge("trillm_active_sequences", "sequences generating now", registry=r)
        self.slots = Gauge("trillm_slots", "sequences that can generate at once (--parallel)", registry=r)
        self.batch_size = Histogram("trillm_decode_batch_size", "sequences a decode step ran together", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))

        self.prompt_totals = [0, 0.0]  # tokens, seconds: for the rates
        self.decode_totals = [0, 0.0]

    def ran_prompt(self, tokens: int, seconds: float):
        self.prompt_tokens.inc(tokens)
        self.prompt_seconds.inc(seconds)
        self.prompt_totals = [self.prompt_totals[0] + tokens, self.prompt_totals[1] + seconds]
        self.prompt_rate.set(self.prompt_totals[0] / max(self.prompt_totals[1], 1e-9))

    def ran_step(self, tokens: int, seconds: float):
        self.decode_seconds.inc(seconds)
        self.batch_size.observe(tokens)
        self.decode_totals = [self.decode_totals[0] + tokens, self.decode_totals[1] + seconds]
        self.decode_rate.set(self.decode_totals[0] / max(self.decode_totals[1], 1e-9))


class Scheduler:
    """`parallel` slots over one batched KV cache, a queue of at most `queue_size` waiting sequences, and
    the loop that runs them on its own thread (start()), prompts on `threads` torch threads."""

    def __init__(self, model, parallel: int, queue_size: int, threads: int | None = None):
        self.model, self.network, self.threads = model, model.network, threads
        self.parallel, self.queue_size = parallel, queue_size
        cache = new_cache(self.network, model.max_context, parallel)
        self.sessions = [Session(cache=cache.row(slot)) for slot in range(parallel)]
        self.free = list(range(parallel))
        self.waiting: deque[Sequence] = deque()
        self.prompting: list[tuple[int, Sequence]] = []  # (slot, sequence) whose prompt is running, in order
        self.running: list[tuple[int, Sequence]] = []  # (slot, sequence) generating
        self.wake = threading.Condition()
        self.metrics = Metrics()
        self.metrics.slots.set(parallel)
        self.thread = threading.Thread(target=self.loop, name="trillm-scheduler", daemon=True)

    def start(self):
        self.thread.start()

    def submit(self, sequences: list[Sequence]):
        """Queue a request's sequences, or refuse them all with QueueFull."""
        with self.wake:
            if len(self.waiting) + len(sequences) > self.queue_size:
                self.metrics.requests.labels("rejected").inc()
                raise QueueFull(f"all {self.parallel} slots are busy and {len(self.waiting)} requests wait: "
                                f"try again shortly")
            self.waiting.extend(sequences)
            self.metrics.queue_depth.set(len(self.waiting))
            self.wake.notify()

    def idle(self) -> bool:
        with self.wake:
            return not (self.waiting or self.prompting or self.running) and len(self.free) == self.parallel

    def loop(self):
        if self.threads:
            torch.set_num_threads(self.threads)  # torch's setting is this thread's own
        while True:
            with self.wake:
                while not (self.waiting or self.prompting or self.running):
                    self.wake.wait()
                admitted = []
                while self.waiting and len(self.free) > len(admitted):
                    admitted.append(self.waiting.popleft())
                self.metrics.queue_depth.set(len(self.waiting))
            with torch.inference_mode():
                for sequence in admitted:
                    self.guarded([self.pick_slot(sequence)], self.begin)
                if self.prompting:  # one piece of the oldest prompt between two decode steps
                    self.guarded(self.prompting[:1], self.prompt_chunk)
                if self.running:
                    self.guarded(self.running, self.step)
            self.metrics.active.set(len(self.running))

    def guarded(self, batch, work):
        """Run work(batch); a failure ends the sequences it was running with an error, not the server."""
        try:
            work(batch)
        except Exception as error:
            log.exception("trillm: internal error in a step")
            message = str(error) if isinstance(error, TrillmError) else \
                f"internal error (a bug in trillm): {type(error).__name__}: {error}"
            for slot, sequence in list(batch):
                self.finish(slot, sequence, ("error", message), outcome="error")

    def pick_slot(self, sequence: Sequence) -> tuple[int, Sequence]:
        """The free slot whose cached tokens share the longest prefix with the prompt (most reuse)."""
        def shared(slot):
            count = 0
            for cached, new in zip(self.sessions[slot].tokens, sequence.prompt_ids):
                if cached != new:
                    break
                count += 1
            return count
        with self.wake:
            slot = max(self.free, key=shared)
            self.free.remove(slot)
        return slot, sequence

    def begin(self, batch):
        """A new sequence takes its slot: its prompt, but for what the slot already holds, is to run."""
        [(slot, sequence)] = batch
        session = sequence.session = self.sessions[slot]
        sequence.pending = sequence.prompt_ids[session.keep_common_prefix(sequence.prompt_ids):]
        self.prompting.append((slot, sequence))

    def prompt_chunk(self, batch):
        """Run the next PROMPT_CHUNK tokens of a sequence's prompt; after the last, take its first token.
        Running prompts by pieces keeps the other sequences' tokens coming while a long one runs; where the
        pieces fall depends on the prompt and what the slot held alone, not on the other sequences."""
        [(slot, sequence)] = batch
        if sequence.cancelled:
            return self.finish(slot, sequence, None, outcome="cancelled")
        piece, sequence.pending = sequence.pending[:PROMPT_CHUNK], sequence.pending[PROMPT_CHUNK:]
        begun = time.perf_counter()
        logits = prefill(self.network, sequence.session, piece)
        self.metrics.ran_prompt(len(piece), time.perf_counter() - begun)
        if not sequence.pending:
            self.prompting.remove((slot, sequence))
            self.running.append((slot, sequence))
            self.advance(slot, sequence, logits)

    def step(self, batch):
        """One decode step: each running sequence's last token through the model, all in one forward."""
        live = []
        for slot, sequence in batch:
            if sequence.cancelled:
                self.finish(slot, sequence, None, outcome="cancelled")
            else:
                live.append((slot, sequence))
        for first in range(0, len(live), MAX_BATCH):
            self.decode(live[first:first + MAX_BATCH])

    def decode(self, live):
        begun = time.perf_counter()
        sessions = [sequence.session for _, sequence in live]
        if len(live) == 1:  # one sequence: its decode plan, one native call a token
            logits = decode_one_token(self.network, sessions[0], live[0][1].next_token)[None]
        else:
            tokens = torch.tensor([[sequence.next_token] for _, sequence in live])
            with torch_threads(1):
                logits = self.network(tokens, [s.cache for s in sessions], [len(s.tokens) for s in sessions],
                                      last_only=True)[:, -1]
            for session, (_, sequence) in zip(sessions, live):
                session.tokens.append(sequence.next_token)
        self.metrics.ran_step(len(live), time.perf_counter() - begun)
        for (slot, sequence), row in zip(live, logits):
            self.advance(slot, sequence, row)

    def advance(self, slot: int, sequence: Sequence, logits: torch.Tensor):
        """Sample the sequence's next token from its logits: send its text, or end it."""
        token = sample_next(logits, sequence.sampling, sequence.generator, sequence.previous_tokens())
        if token in self.model.stop_ids and not sequence.ignore_eos:
            return self.end(slot, sequence, "stop", token)
        sequence.generated += 1
        self.metrics.generated_tokens.inc()
        delta, stopped = sequence.reply.push(token)
        if delta:
            sequence.send(("delta", delta))
        if stopped:
            return self.end(slot, sequence, "stop", None)
        if sequence.generated == sequence.max_tokens or len(sequence.session.tokens) >= self.model.max_context:
            return self.end(slot, sequence, "length", None)
        sequence.history.append(token)
        sequence.next_token = token

    def end(self, slot: int, sequence: Sequence, reason: str, stop_token: int | None):
        delta = sequence.reply.end(stop_token)
        if delta:
            sequence.send(("delta", delta))
        if sequence.reply.tool_calls:
            reason = "tool_calls"
        self.finish(slot, sequence, ("end", reason, sequence.reply.tool_calls, len(sequence.prompt_ids),
                                     sequence.generated), outcome="completed")

    def finish(self, slot: int, sequence: Sequence, event: tuple | None, outcome: str):
        """Free the sequence's slot (its cache stays, for a prompt that continues it) and send its last event."""
        self.prompting = [(s, q) for s, q in self.prompting if q is not sequence]
        self.running = [(s, q) for s, q in self.running if q is not sequence]
        with self.wake:
            self.free.append(slot)
        self.metrics.requests.labels(outcome).inc()
        if event is not None:
            sequence.send(event)
