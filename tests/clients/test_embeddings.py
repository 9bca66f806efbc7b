"""Embeddings through the official SDK and LangChain, against the embedding-model server that
scripts/test-clients.sh starts (all-MiniLM-L6-v2). Vectors are compared with
sentence-transformers' own (tests/golden/all-minilm-l6-v2.json, scripts/golden/make_embeddings.py).
"""

from __future__ import annotations

import json
import math
import os

import openai
import pytest

from conftest import make_client


# The server's default encoder arithmetic multiplies in bf16 (f32 sums): issue 25's bar for it
# is cosine >= 0.9999 to sentence-transformers' fp32 vectors (`--dtype float32` gives >= 0.99999).
BAR = 0.9999


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb)


@pytest.fixture(scope="module")
def embed_url() -> str:
    return os.environ["SPINDLE_EMBED_BASE_URL"].rstrip("/")


@pytest.fixture(scope="module")
def embed_model() -> str:
    return os.environ.get("SPINDLE_EMBED_MODEL_NAME", "minilm")


@pytest.fixture(scope="module")
def embed_client(embed_url: str) -> openai.OpenAI:
    c = make_client(embed_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference() -> list[dict]:
    with open(os.environ["SPINDLE_EMBED_REFERENCE"], encoding="utf-8") as f:
        items = json.load(f)["items"]
    return [i for i in items if not i["truncated"]]


def test_sdk_default_base64_path_matches_sentence_transformers(embed_client, embed_model, reference):
    # Without encoding_format the SDK asks for base64 and decodes the float32 bytes itself.
    texts = [r["text"] for r in reference]
    resp = embed_client.embeddings.create(model=embed_model, input=texts)
    assert resp.object == "list"
    assert resp.model == embed_model
    assert [d.index for d in resp.data] == list(range(len(texts)))
    for d, r in zip(resp.data, reference):
        assert len(d.embedding) == 384
        assert _cosine(d.embedding, r["embedding"]) >= BAR, r["text"]
    assert resp.usage.prompt_tokens == sum(len(r["token_ids"]) for r in reference)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens


def test_sdk_float_and_token_inputs(embed_client, embed_model, reference):
    floats = embed_client.embeddings.create(
        model=embed_model, input=reference[1]["text"], encoding_format="float"
    )
    assert _cosine(floats.data[0].embedding, reference[1]["embedding"]) >= BAR
    tokens = embed_client.embeddings.create(
        model=embed_model, input=[r["token_ids"] for r in reference[:3]], encoding_format="float"
    )
    for d, r in zip(tokens.data, reference[:3]):
        assert _cosine(d.embedding, r["embedding"]) >= BAR


def test_sdk_errors(embed_client, embed_model):
    with pytest.raises(openai.BadRequestError) as e:
        embed_client.embeddings.create(model=embed_model, input="x", dimensions=64)
    assert e.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError) as e:
        embed_client.embeddings.create(model=embed_model, input=[])
    assert e.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError):
        embed_client.chat.completions.create(
            model=embed_model, messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.NotFoundError):
        embed_client.embeddings.create(model="not-served", input="x")


def test_generative_model_refuses_embeddings(client, model):
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=model, input="hello")


def test_langchain_openai_embeddings(embed_url, embed_model, reference):
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(
        model=embed_model,
        base_url=f"{embed_url}/v1",
        api_key="unused",
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    docs = emb.embed_documents([r["text"] for r in reference[:5]])
    assert len(docs) == 5
    for got, r in zip(docs, reference[:5]):
        assert _cosine(got, r["embedding"]) >= BAR, r["text"]
    query = emb.embed_query(reference[2]["text"])
    assert _cosine(query, reference[2]["embedding"]) >= BAR
