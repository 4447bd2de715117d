"""`trillm serve`: the official `openai` client as the peer (chat and completions, streamed and not, usage,
stop strings, seeds), the real shipped model's greedy replies equal to trillm's own generate(), hostile
requests answered with the right 4xx while the server keeps serving, and 32 concurrent streaming clients
with no cross-talk."""

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import trillm
from trillm.engine import Sampling
from server_support import running_server

MESSAGES = [{"role": "user", "content": "Tell me a long story about a dragon."}]


@pytest.fixture(scope="module")
def model():
    return trillm.load(None, ctx_size=512)


@pytest.fixture(scope="module")
def served(model):
    with running_server(model, parallel=4, queue_size=64) as (url, server):
        yield url, server


@pytest.fixture
def client(served):
    url, _ = served
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def request(served, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None):
    """(status, headers, parsed JSON or text) of a raw HTTP request."""
    url, _ = served
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    try:
        return response.status, dict(response.getheaders()), json.loads(text)
    except json.JSONDecodeError:
        return response.status, dict(response.getheaders()), text


def post(served, path: str, payload: dict, headers: dict | None = None):
    return request(served, "POST", path, json.dumps(payload), headers)


def test_chat_greedy_reply_is_trillms_own_with_usage(client, served, model):
    _, server = served
    reply = client.chat.completions.create(model=server.model_id, messages=MESSAGES, max_tokens=24, temperature=0)
    expected = model.generate(MESSAGES, 24, Sampling(temperature=0))
    assert reply.choices[0].message.content == expected and expected
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(model.chat_prompt(MESSAGES))
    assert reply.usage.completion_tokens == 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 24
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")


def test_chat_stream_equals_the_whole_reply_and_reports_usage(client, served):
    _, server = served
    whole = client.chat.completions.create(model=server.model_id, messages=MESSAGES, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=server.model_id, messages=MESSAGES, max_tokens=20,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completions_continue_the_prompt_streamed_or_not(client, served, model):
    _, server = served
    prompt = "Once upon a time"
    whole = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=16, temperature=0)
    assert whole.choices[0].text == model.generate(prompt, 16, Sampling(temperature=0))
    assert whole.usage.prompt_tokens == len(model.encode_prompt(prompt)) and whole.usage.completion_tokens == 16
    streamed = list(client.completions.create(model=server.model_id, prompt=prompt, max_tokens=16, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    ids = client.completions.create(model=server.model_id, prompt=model.encode_prompt(prompt), max_tokens=16,
                                    temperature=0)
    assert ids.choices[0].text == whole.choices[0].text


def test_a_long_prompt_runs_in_pieces_between_decode_steps(client, served, model):
    _, server = served
    prompt = "The quick brown fox jumps over the lazy dog. " * 40  # ~400 tokens: two pieces
    assert len(model.encode_prompt(prompt)) > 256
    reply = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=8, temperature=0)
    assert reply.choices[0].text == model.generate(prompt, 8, Sampling(temperature=0))


def test_a_stop_string_ends_the_reply_before_it(client, served):
    _, server = served
    full = client.completions.create(model=server.model_id, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = client.completions.create(model=server.model_id, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=server.model_id, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_a_seed_repeats_a_sampled_reply(client, served):
    _, server = served

    def sampled(seed):
        return client.chat.completions.create(model=server.model_id, messages=MESSAGES, max_tokens=24,
                                              temperature=1.2, top_p=1, seed=seed,
                                              extra_body={"top_k": 0, "min_p": 0}).choices[0].message.content
    assert sampled(7) == sampled(7)
    assert len({sampled(7), sampled(8), sampled(9)}) > 1


def test_n_choices_are_separate_draws(client, served):
    _, server = served
    reply = client.chat.completions.create(model=server.model_id, messages=MESSAGES, max_tokens=12, temperature=1.2,
                                           top_p=1, seed=3, n=3, extra_body={"top_k": 0, "min_p": 0})
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1
    assert reply.usage.completion_tokens == sum(12 for _ in reply.choices)


def test_n_streamed_choices_come_apart_by_index(client, served):
    _, server = served
    chunks = list(client.chat.completions.create(model=server.model_id, messages=MESSAGES, max_tokens=6, n=2,
                                                 temperature=0, stream=True))
    texts, reasons = ["", ""], [None, None]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts[0] == texts[1] and texts[0]  # greedy: the same reply twice
    assert reasons == ["length", "length"]


def test_models_health_tokenize_detokenize_metrics(client, served, model):
    _, server = served
    assert [m.id for m in client.models.list().data] == [server.model_id]
    assert request(served, "GET", "/health")[:1] == (200,)
    status, _, tokens = post(served, "/tokenize", {"content": "Hello, world!"})
    assert status == 200 and tokens["tokens"] == model.tokenizer.encode("Hello, world!", add_special_tokens=False)
    status, _, text = post(served, "/detokenize", {"tokens": tokens["tokens"]})
    assert status == 200 and text["content"] == "Hello, world!"
    status, headers, metrics = request(served, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("trillm_requests_total", "trillm_generated_tokens_total", "trillm_decode_tokens_per_second",
                 "trillm_queue_depth", "trillm_active_sequences"):
        assert f"\n{name}" in metrics


def test_health_is_503_while_the_model_loads(model):
    loaded = threading.Event()

    def slow_load():
        loaded.wait(30)
        return model
    from trillm.server.app import Server, create_app
    from fastapi.testclient import TestClient
    server = Server(slow_load, 1, 1)
    with TestClient(create_app(server)) as test_client:
        response = test_client.get("/health")
        assert response.status_code == 503 and response.json()["error"]["type"] == "unavailable_error"
        assert test_client.post("/v1/completions", json={"prompt": "x"}).status_code == 503
        loaded.set()
        deadline = time.monotonic() + 30
        while test_client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


# ---- Abuse: each answered with its 4xx, and the server serves the next request ------------------------------

HOSTILE = [
    ("malformed JSON", "/v1/chat/completions", b'{"messages": [', 400, "invalid_json"),
    ("not an object", "/v1/chat/completions", b'[1, 2]', 400, "invalid_value"),
    ("wrong type", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": "many"}, 400, "invalid_value"),
    ("messages not a list", "/v1/chat/completions", {"messages": "hi"}, 400, "invalid_value"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "invalid_value"),
    ("no messages", "/v1/chat/completions", {"max_tokens": 3}, 400, "invalid_value"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-9", "messages": MESSAGES}, 404, "model_not_found"),
    ("negative temperature", "/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, 400, "invalid_value"),
    ("top_p zero", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "invalid_value"),
    ("negative max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": -5}, 400, "invalid_value"),
    ("max_tokens beyond the context", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 100000}, 400,
     "context_length_exceeded"),
    ("a prompt beyond the context", "/v1/completions", {"prompt": "word " * 2000}, 400, None),
    ("zero max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "invalid_value"),
    ("a seed past 64 bits", "/v1/completions", {"prompt": "x", "seed": 2**64 + 5}, 400, "invalid_value"),
    ("1000 completions", "/v1/chat/completions", {"messages": MESSAGES, "n": 1000}, 400, "invalid_value"),
    ("a role the template rejects", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, None),
    ("token outside the vocabulary", "/v1/completions", {"prompt": [1, 10**9]}, 400, None),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, None),
    ("image content", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, None),
    ("too many stop strings", "/v1/completions", {"prompt": "x", "stop": ["a"] * 100}, 400, "invalid_stop"),
    ("a megabyte stop string", "/v1/completions", {"prompt": "x", "stop": "a" * 2**20}, 400, "invalid_stop"),
    ("tools for a model without harmony", "/v1/chat/completions",
     {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, None),
    ("detokenize outside the vocabulary", "/detokenize", {"tokens": [-1]}, 400, None),
]


@pytest.mark.parametrize("what, path, body, status, code", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_a_hostile_request_gets_its_4xx_and_the_server_goes_on(served, what, path, body, status, code):
    payload = body if isinstance(body, bytes) else json.dumps(body)
    got, _, answer = request(served, "POST", path, payload)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "code"} and answer["error"]["message"]
    if code is not None:
        assert answer["error"]["code"] == code
    assert post(served, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200


def test_a_10_mb_body_is_refused_unread(served):
    status, _, answer = request(served, "POST", "/v1/completions", b'{"prompt": "' + b"a" * (10 * 2**20) + b'"}')
    assert status == 413 and answer["error"]["code"] == "body_too_large"
    # The same without a Content-Length (chunked): refused as it arrives.
    url, _ = served
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    chunks = (b"a" * 2**20 for _ in range(10))
    connection.request("POST", "/v1/completions", body=chunks, headers={"Content-Type": "application/json"},
                       encode_chunked=True)
    assert connection.getresponse().status == 413
    connection.close()
    assert post(served, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200


def test_an_api_key_is_required_when_set(model):
    with running_server(model, parallel=1, api_key="sesame") as (url, server):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            status, _, answer = request((url, server), "POST", "/v1/completions", json.dumps({"prompt": "x"}),
                                        {"Content-Type": "application/json", **headers})
            assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert request((url, server), "GET", "/v1/models")[0] == 401
        assert request((url, server), "GET", "/health")[0] == 200  # health and the page need no key
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert keyed.completions.create(model=server.model_id, prompt="Hi", max_tokens=2).choices[0].text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def wait_until_idle(server, seconds: float = 30):
    deadline = time.monotonic() + seconds
    while not server.scheduler.idle():
        assert time.monotonic() < deadline, "the server did not free its slots"
        time.sleep(0.02)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served):
    url, server = served
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"messages": MESSAGES, "max_tokens": 400, "temperature": 0, "stream": True}).encode()
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body) + body)
        received = b""
        while b"data:" not in received:  # the first event came: it is generating
            received += raw.recv(4096)
    wait_until_idle(server)
    generated = server.scheduler.metrics.generated_tokens._value.get()
    assert post(served, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200
    assert server.scheduler.metrics.generated_tokens._value.get() - generated == 2  # the dropped one stopped


def test_a_client_that_disconnects_while_waiting_for_a_whole_reply_frees_its_slot(served):
    url, server = served
    host, port = url.removeprefix("http://").split(":")
    cancelled = server.scheduler.metrics.requests.labels("cancelled")._value.get()
    body = json.dumps({"messages": MESSAGES, "max_tokens": 400, "temperature": 0, "ignore_eos": True}).encode()
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 30
        while server.scheduler.idle():  # it started
            assert time.monotonic() < deadline
            time.sleep(0.01)
    wait_until_idle(server)
    assert server.scheduler.metrics.requests.labels("cancelled")._value.get() == cancelled + 1


def test_a_full_queue_answers_503_with_retry_after(model):
    with running_server(model, parallel=1, queue_size=1) as (url, server):
        gate = threading.Event()
        original = server.scheduler.step

        def held_step(batch):  # keeps the one slot busy until the test lets it go
            gate.wait(30)
            original(batch)
        server.scheduler.step = held_step
        with ThreadPoolExecutor(2) as pool:
            busy = pool.submit(post, (url, server), "/v1/completions", {"prompt": "Hi", "max_tokens": 3})
            deadline = time.monotonic() + 30
            while server.scheduler.idle():  # the first one holds the slot
                assert time.monotonic() < deadline
                time.sleep(0.01)
            waiting = pool.submit(post, (url, server), "/v1/completions", {"prompt": "Hi", "max_tokens": 3})
            while not server.scheduler.waiting:  # the second one waits in the queue
                assert time.monotonic() < deadline
                time.sleep(0.01)
            status, headers, answer = post((url, server), "/v1/completions", {"prompt": "Hi", "max_tokens": 3})
            assert status == 503 and headers.get("retry-after") and answer["error"]["type"] == "unavailable_error"
            gate.set()
            assert busy.result()[0] == waiting.result()[0] == 200


def test_the_command_fails_in_one_line(served, tmp_path):
    """A model that cannot load, a port already taken, slots that cannot fit in memory: exit 1 with one error
    line, not a traceback."""
    url, _ = served
    port = url.rsplit(":", 1)[1]
    for arguments, error in ((["-m", str(tmp_path / "missing"), "--port", "0"], "no such file or folder"),
                             (["--port", port], f"cannot listen on 127.0.0.1:{port}"),
                             (["--port", "0", "--parallel", "100000"], "lower -c/--ctx-size or --parallel")):
        done = subprocess.run([sys.executable, "-m", "trillm.cli", "serve", *arguments], capture_output=True,
                              text=True, timeout=120)
        errors = [line for line in done.stderr.splitlines() if "error" in line]
        assert done.returncode == 1 and len(errors) == 1 and error in errors[0], done.stderr


# ---- Load ------------------------------------------------------------------------------------------------

def test_32_concurrent_streams_each_get_what_they_would_alone(model):
    prompts = [f"Write a sentence about the number {k}." for k in range(8)]
    with running_server(model, parallel=8, queue_size=64) as (url, server):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def stream(prompt):
            chunks = client.chat.completions.create(model=server.model_id, temperature=0, max_tokens=24, stream=True,
                                                    messages=[{"role": "user", "content": prompt}])
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        alone = {prompt: stream(prompt) for prompt in prompts}
        registry = server.scheduler.metrics.registry
        assert registry.get_sample_value("trillm_decode_batch_size_bucket", {"le": "1.0"}) == \
            registry.get_sample_value("trillm_decode_batch_size_count")  # alone: one sequence a step
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(stream, prompts * 4, timeout=300))
        assert together == [alone[prompt] for prompt in prompts * 4]
        assert registry.get_sample_value("trillm_decode_batch_size_bucket", {"le": "4.0"}) < \
            registry.get_sample_value("trillm_decode_batch_size_count")  # together: steps of more than 4
        wait_until_idle(server)
