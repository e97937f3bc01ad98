"""The OpenAI-compatible server, through the official ``openai`` client: what it generates is what
``model.generate`` gives (greedy, alone or batched with others; seeded sampling), streamed or whole,
cut at stop strings, and every mistake is an OpenAI error with its status code."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from bitnet.cli import main

pytest.importorskip("tokenizers")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from serve_helpers import API_KEY, MODEL_NAME, running_server, wait_until  # noqa: E402

PROMPTS = ["def fibonacci(n):", "import numpy as np\n", "class Stack:\n    def push(self, item):",
           "for i in range(10):"]


@pytest.fixture(scope="module")
def server():
    with running_server(max_batch=4, max_queue=4) as running:
        yield running


def reference(server, ids: list[int], max_tokens: int, **sampling) -> tuple[str, int, str]:
    """``(text, completion tokens, finish_reason)`` of ``model.generate``; the EOS token adds no text."""
    tokens = server.model.generate(ids, max_tokens, **sampling)
    stopped = tokens[-1] in server.model.config.stop_token_ids
    text = server.tokenizer.decode(tokens[:-1] if stopped else tokens)
    return text, len(tokens), "stop" if stopped else "length"


def completion_reference(server, prompt: str, max_tokens: int, **sampling) -> tuple[str, int, str]:
    return reference(server, server.tokenizer.encode(prompt).ids, max_tokens, **sampling)


def chat_reference(server, content: str, max_tokens: int) -> tuple[str, str]:
    """The reply to one user turn through the plain transcript: greedy, cut at the next turn, stripped."""
    text, _, finish = reference(server, server.tokenizer.encode(f"User: {content}\nAssistant:").ids, max_tokens)
    if "\nUser:" in text:
        return text.split("\nUser:")[0].lstrip(), "stop"
    return text.lstrip(), finish


def test_greedy_completion_equals_generate(server):
    client = server.client()
    for prompt in PROMPTS[:2]:
        text, tokens, finish = completion_reference(server, prompt, 40)
        response = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=40, temperature=0)
        choice = response.choices[0]
        assert (choice.text, choice.finish_reason) == (text, finish)
        assert response.usage.completion_tokens == tokens
        assert response.usage.prompt_tokens == len(server.tokenizer.encode(prompt).ids)
        assert response.usage.total_tokens == response.usage.prompt_tokens + tokens


def test_token_id_prompts_and_seeded_sampling_equal_generate(server):
    ids = server.tokenizer.encode(PROMPTS[2]).ids
    text, tokens, _ = reference(server, ids, 30, temperature=0.8, top_p=0.9, seed=7)
    response = server.client().completions.create(model=MODEL_NAME, prompt=ids, max_tokens=30, temperature=0.8,
                                                  top_p=0.9, seed=7)
    assert response.choices[0].text == text and response.usage.completion_tokens == tokens


def test_greedy_equals_generate_while_other_requests_share_the_batch(server, monkeypatch):
    """Four requests (completions and chat, whole and streamed) run together: each gets its own greedy text."""
    expected = [completion_reference(server, p, 30 + 10 * i) for i, p in enumerate(PROMPTS[:3])]
    expected_chat = chat_reference(server, "write a loop", 50)
    forward_batch = server.model.forward_batch

    def held(sequences, caches, out=None):  # the first step waits until all four are in, so they share steps
        assert wait_until(lambda: server.engine.outstanding == 4)
        monkeypatch.undo()
        return forward_batch(sequences, caches, out)

    monkeypatch.setattr(server.model, "forward_batch", held)
    first_step = len(server.batch_sizes)
    client = server.client()
    results: dict[int, tuple] = {}

    def complete(i: int) -> None:
        if i == 3:
            response = client.chat.completions.create(model=MODEL_NAME, max_tokens=50, temperature=0,
                                                      messages=[{"role": "user", "content": "write a loop"}])
            results[i] = (response.choices[0].message.content, response.choices[0].finish_reason)
        elif i == 2:
            chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPTS[i], max_tokens=50,
                                                    temperature=0, stream=True))
            results[i] = ("".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason)
        else:
            response = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[i], max_tokens=30 + 10 * i,
                                                 temperature=0)
            results[i] = (response.choices[0].text, response.choices[0].finish_reason)

    threads = [threading.Thread(target=complete, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(3):
        assert results[i] == (expected[i][0], expected[i][2])
    assert results[3] == expected_chat
    assert max(server.batch_sizes[first_step:]) == 4


def test_streaming_completion_adds_up_to_the_whole_one(server):
    text, tokens, finish = completion_reference(server, PROMPTS[3], 40)
    chunks = list(server.client().completions.create(model=MODEL_NAME, prompt=PROMPTS[3], max_tokens=40,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
    *texts, last, usage = chunks
    assert "".join(c.choices[0].text for c in [*texts, last]) == text
    assert all(c.choices[0].finish_reason is None for c in texts) and last.choices[0].finish_reason == finish
    assert usage.choices == [] and usage.usage.completion_tokens == tokens


def test_chat_whole_and_streamed(server):
    text, finish = chat_reference(server, "hello", 60)
    client = server.client()
    messages = [{"role": "user", "content": "hello"}]
    response = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=60, temperature=0)
    assert (response.choices[0].message.content, response.choices[0].finish_reason) == (text, finish)
    assert response.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=60, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish


def test_chat_through_the_model_s_template(tmp_path):
    """With a chat template the prompt is the rendered conversation, and the reply is the model's own text."""
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def add(a, b):"}]
    with running_server(chat_dir=tmp_path) as server:
        rendered = "<system>be brief\n<user>def add(a, b):\n<assistant>"
        text, tokens, finish = reference(server, server.tokenizer.encode(rendered, add_special_tokens=False).ids, 40)
        response = server.client().chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=40,
                                                           temperature=0)
    assert (response.choices[0].message.content, response.choices[0].finish_reason) == (text, finish)
    assert response.usage.completion_tokens == tokens


def test_stop_strings_cut_the_text_before_them(server):
    text, tokens, _ = completion_reference(server, PROMPTS[0], 60)
    stop = text[len(text) // 2: len(text) // 2 + 3]  # three characters from the middle of the greedy text
    assert stop and stop in text
    client = server.client()
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=60, temperature=0,
                                         stop=["never appears", stop])
    assert response.choices[0].text == text[: text.find(stop)]
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens < tokens
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=60, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text[: text.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("request_args, error, status, message", [
    (dict(prompt="x", max_tokens=0), openai.BadRequestError, 400, "'max_tokens' must be an integer >= 1"),
    (dict(prompt="x", temperature=3), openai.BadRequestError, 400, "'temperature' must be a number in [0, 2]"),
    (dict(prompt="x", n=2), openai.BadRequestError, 400, "'n' = 2 is not supported"),
    (dict(prompt="x", stop=["a", ""]), openai.BadRequestError, 400, "'stop' must be a non-empty string"),
    (dict(prompt=[[1, 2], [3]]), openai.BadRequestError, 400, "one prompt per request"),
    (dict(prompt=[4096]), openai.BadRequestError, 400, "token ids must lie in [0, 4096)"),
    (dict(prompt="x", model="gpt-4"), openai.NotFoundError, 404, "the model 'gpt-4' does not exist here"),
    (dict(prompt=" ".join(map(str, range(300)))), openai.APIStatusError, 413,
     "plus 16 tokens to generate exceed the context of 256"),
    (dict(prompt="x", max_tokens=300), openai.APIStatusError, 413, "plus 300 tokens to generate exceed"),
])
def test_bad_completion_requests_get_openai_errors(server, request_args, error, status, message):
    with pytest.raises(error) as caught:
        server.client().completions.create(**{"model": MODEL_NAME, **request_args})
    assert caught.value.status_code == status and message in caught.value.body["message"]
    assert set(caught.value.body) == {"message", "type", "param", "code"}


def test_bad_chat_requests_get_openai_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="'messages' must be a non-empty list"):
        client.chat.completions.create(model=MODEL_NAME, messages=[])
    with pytest.raises(openai.BadRequestError, match="messages\\[0\\].role must be one of system, user, assistant"):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(openai.APIStatusError, match="fill the context") as caught:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "y " * 300}])
    assert caught.value.status_code == 413 and caught.value.code == "context_length_exceeded"


def test_unauthorized_requests_are_refused(server):
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=server.url, api_key="wrong-key", max_retries=0).models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    assert httpx.get(f"{server.url}/models").status_code == 401
    assert httpx.post(f"{server.url}/completions", json={"prompt": "x"}).status_code == 401


def test_models_health_and_http_errors(server):
    client = server.client()
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    root = server.url.removesuffix("/v1")
    assert httpx.get(f"{root}/health", headers=headers).json() == {"status": "ok", "requests": 0}
    for response, status in [(httpx.get(f"{server.url}/nothing", headers=headers), 404),
                             (httpx.get(f"{server.url}/completions", headers=headers), 405),
                             (httpx.post(f"{server.url}/completions", headers=headers, content=b"{not json"), 400),
                             (httpx.post(f"{server.url}/completions", headers=headers, json=[1]), 400)]:
        assert response.status_code == status
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_cli_serves_with_the_key_from_the_environment():
    """``python -m bitnet serve`` in a process of its own: it answers, requires the key, and stops on Ctrl-C."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "BITNET_API_KEY": "from-env"}
    process = subprocess.Popen([sys.executable, "-m", "bitnet", "serve", "--port", str(port), "--max-batch", "2"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health", headers={"Authorization": "Bearer from-env"}).status_code == 200
            except httpx.TransportError:
                return process.poll() is not None  # stop waiting if it died

        assert wait_until(healthy, 180) and process.poll() is None
        assert httpx.get(f"{url}/health").status_code == 401
        reply = httpx.post(f"{url}/v1/completions", headers={"Authorization": "Bearer from-env"},
                           json={"prompt": "def ", "max_tokens": 3})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "serving bitnet-bundled at http://127.0.0.1" in stderr and "Traceback" not in stderr


def test_serve_without_the_extra_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "bitnet.serve.server", raising=False)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: serving needs uvicorn and starlette") and err.count("\n") == 1
    assert 'pip install "bitnet-numba[serve]"' in err


def test_help_needs_no_serving_packages():
    code = ("import sys; sys.modules.update(uvicorn=None, starlette=None)\n"
            "from bitnet.cli import main; sys.exit(main(['--help']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "serve" in done.stdout, done.stderr


@pytest.mark.parametrize("args, message", [
    (["serve", "--max-batch", "0"], "--max-batch: 0 is below 1"),
    (["serve", "--port", "x"], "'x' is not a whole number"),
    (["serve", "--max-context", "1000"], "max_context 1000 exceeds the model's context of 256"),
])
def test_bad_serve_settings_are_one_error_line(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
