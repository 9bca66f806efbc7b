"""Shared fixtures for the OpenAI-SDK client suite.

The suite drives a real `spindle serve` through the official `openai` Python SDK. The servers
are started by `scripts/test-clients.sh`, which passes them in through the environment:

    SPINDLE_BASE_URL        root URL of the server under test, e.g. http://127.0.0.1:8123
    SPINDLE_MODEL_NAME      its --served-model-name (default: smol)
    SPINDLE_MAX_MODEL_LEN   its --max-model-len (default: 2048)
    SPINDLE_AUTH_BASE_URL   root URL of a second server started with --api-key
    SPINDLE_AUTH_API_KEY    that server's key

The SDK's automatic retries are turned off so that every status the server returns is seen.
"""

from __future__ import annotations

import json
import os
import urllib.request

import openai
import pytest

REQUIRED_ENV = ("SPINDLE_BASE_URL", "SPINDLE_AUTH_BASE_URL", "SPINDLE_AUTH_API_KEY")

# A prompt whose answer is much longer than any max_tokens used here.
LONG_ANSWER_PROMPT = "Write a short story about a cat."
# A prompt the model answers in a couple of tokens and then stops (end of turn).
SHORT_ANSWER_PROMPT = "Reply with one word: yes or no. Is the sky blue?"


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [name for name in REQUIRED_ENV if not os.environ.get(name)]
    if missing:
        pytest.exit(
            f"missing {', '.join(missing)}: run the suite through scripts/test-clients.sh",
            returncode=2,
        )


def _root(name: str) -> str:
    return os.environ[name].rstrip("/")


@pytest.fixture(scope="session")
def base_url() -> str:
    return _root("SPINDLE_BASE_URL")


@pytest.fixture(scope="session")
def model() -> str:
    return os.environ.get("SPINDLE_MODEL_NAME", "smol")


@pytest.fixture(scope="session")
def max_model_len() -> int:
    return int(os.environ.get("SPINDLE_MAX_MODEL_LEN", "2048"))


def make_client(root: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{root}/v1", api_key=api_key, max_retries=0, timeout=120.0)


@pytest.fixture(scope="session")
def client(base_url: str) -> openai.OpenAI:
    c = make_client(base_url)
    yield c
    c.close()


@pytest.fixture(scope="session")
def auth_base_url() -> str:
    return _root("SPINDLE_AUTH_BASE_URL")


@pytest.fixture(scope="session")
def auth_api_key() -> str:
    return os.environ["SPINDLE_AUTH_API_KEY"]


def post_json(url: str, body: dict) -> dict:
    """POST a JSON body with the standard library (for vLLM's non-OpenAI routes)."""
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200, resp.status
        return json.loads(resp.read())


@pytest.fixture(scope="session")
def tokenize(base_url: str, model: str):
    """Token ids of a text prompt, as the server's `POST /tokenize` returns them."""

    def _tokenize(prompt: str) -> list[int]:
        out = post_json(f"{base_url}/tokenize", {"model": model, "prompt": prompt})
        tokens = out["tokens"]
        assert isinstance(tokens, list) and all(isinstance(t, int) for t in tokens), out
        assert out["count"] == len(tokens), out
        return tokens

    return _tokenize


@pytest.fixture(scope="session")
def tokenize_chat(base_url: str, model: str):
    """Prompt length of a chat request, as the server's `POST /tokenize` counts it."""

    def _count(messages: list[dict]) -> int:
        out = post_json(
            f"{base_url}/tokenize",
            {"model": model, "messages": messages, "add_generation_prompt": True},
        )
        return out["count"]

    return _count


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def check_usage(usage, max_completion_tokens: int | None = None) -> None:
    """`usage` is present and consistent."""
    assert usage is not None
    assert usage.prompt_tokens > 0, usage
    assert usage.completion_tokens >= 0, usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage
    if max_completion_tokens is not None:
        assert usage.completion_tokens <= max_completion_tokens, usage
