"""The OpenAI-compatible server (its own engine process): a chat message with an `image_url`, token for token, and
the requests a GAP model refuses before they reach the engine (HTTP 400): prompts holding latent slots, structured
output."""

import base64
import os
import socket
import subprocess
import sys
import time

import pytest
import requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(fixtures):
    port = _free_port()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", fixtures["checkpoint"],
        "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "512",
        "--enforce-eager", "--no-enable-prefix-caching", "--kv-cache-memory-bytes", str(1 << 22),
        "--block-size", "32", "--limit-mm-per-prompt", '{"image": 1}', "--served-model-name", "gap",
    ]
    log = open(os.path.join(fixtures["dir"], "server.log"), "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 400
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: see {log.name}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"the server did not start: see {log.name}")
            time.sleep(2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_chat_with_image_url(server, fixtures):
    with open(fixtures["image"], "rb") as f:
        data_url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    question = fixtures["image_prompt"].split("<|vision_end|>")[1].split("<|im_end|>")[0]
    body = {
        "model": "gap",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                  {"type": "text", "text": question}]}],
        "max_tokens": fixtures["max_new_tokens"], "temperature": 0, "return_token_ids": True,
    }
    reply = requests.post(server + "/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["token_ids"] == fixtures["cases"]["image"]
    body["vllm_xargs"] = {"latent_intervention": "zero"}
    reply = requests.post(server + "/v1/chat/completions", json=body, timeout=120)
    assert reply.json()["choices"][0]["token_ids"] == fixtures["cases"]["image_zero"]
    body["vllm_xargs"] = {"latent_intervention": "sideways"}  # refused per request (HTTP 400), server stays up
    assert requests.post(server + "/v1/chat/completions", json=body, timeout=120).status_code == 400


LATENT_REFUSAL = "a prompt cannot carry latent vectors"


def _refused(reply, words):
    assert reply.status_code == 400, (reply.status_code, reply.text)
    assert words in reply.text, reply.text


def test_prompts_with_latent_slots_are_refused(server, fixtures):
    """A prompt holding `<|latent_pad|>` slots (text, token ids or chat) gets HTTP 400 before it reaches the engine;
    a prompt ending in `<|latent_start|>` opens a span and is served."""
    pad, start = fixtures["ids"]["pad"], fixtures["ids"]["start"]
    prompt = fixtures["prompts"][1]
    body = {"model": "gap", "max_tokens": fixtures["max_new_tokens"], "temperature": 0, "return_token_ids": True}
    spans = prompt + "<|latent_start|><|latent_pad|><|latent_pad|><|latent_end|>"
    _refused(requests.post(server + "/v1/completions", json={**body, "prompt": spans}, timeout=120), LATENT_REFUSAL)
    tokens = requests.post(server + "/tokenize", json={"model": "gap", "prompt": prompt, "add_special_tokens": False},
                           timeout=120).json()["tokens"]
    reply = requests.post(server + "/v1/completions", json={**body, "prompt": tokens + [start, pad]}, timeout=120)
    _refused(reply, LATENT_REFUSAL)
    chat = {**body, "messages": [{"role": "user", "content": "What is <|latent_pad|> plus two?"}]}
    _refused(requests.post(server + "/v1/chat/completions", json=chat, timeout=120), LATENT_REFUSAL)

    reply = requests.post(server + "/v1/completions", json={**body, "prompt": prompt + "<|latent_start|>"},
                          timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["token_ids"] == fixtures["cases"]["ends_in_start_pca"]


def test_structured_output_is_refused(server, fixtures):
    """Structured output (a grammar mask) would fight the span rule: HTTP 400 for a GAP model, server stays up."""
    body = {"model": "gap", "max_tokens": 8, "temperature": 0}
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    chat = {**body, "messages": [{"role": "user", "content": "What is two plus two?"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}}
    _refused(requests.post(server + "/v1/chat/completions", json=chat, timeout=120), "structured output")
    completion = {**body, "prompt": fixtures["prompts"][1], "structured_outputs": {"choice": ["four", "five"]}}
    _refused(requests.post(server + "/v1/completions", json=completion, timeout=120), "structured output")
    reply = requests.post(server + "/v1/completions", json={**body, "prompt": fixtures["prompts"][1]}, timeout=120)
    assert reply.status_code == 200, reply.text
