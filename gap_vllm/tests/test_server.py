"""The OpenAI-compatible server (its own engine process): a chat message with an `image_url`, token for token."""

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
