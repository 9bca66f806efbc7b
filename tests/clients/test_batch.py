"""The Batch API through the official SDK, unchanged: client.files.create / batches.create /
batches.retrieve / files.content / batches.list / batches.cancel / files.delete, against the
main server and (for /v1/embeddings) the embedding server that scripts/test-clients.sh starts.
"""

from __future__ import annotations

import io
import json
import math
import os
import time

import openai
import pytest

from conftest import make_client, user

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def _jsonl(lines: list[dict]) -> bytes:
    return ("\n".join(json.dumps(l) for l in lines) + "\n").encode()


def _wait(client: openai.OpenAI, batch_id: str, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in TERMINAL:
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    return [json.loads(l) for l in text.splitlines() if l.strip()]


def test_chat_batch_round_trip_equals_direct_requests(client: openai.OpenAI, model: str) -> None:
    questions = [f"Name a fruit that starts with the letter {c}." for c in "ABCDEF"]
    requests = [
        {
            "custom_id": f"q-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": user(q), "max_tokens": 10, "temperature": 0},
        }
        for i, q in enumerate(questions)
    ]
    requests.append(
        {
            "custom_id": "bad",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": user("x"), "top_p": 7},
        }
    )
    uploaded = client.files.create(file=("requests.jsonl", io.BytesIO(_jsonl(requests))), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    assert client.files.retrieve(uploaded.id).filename == "requests.jsonl"
    assert uploaded.id in [f.id for f in client.files.list(purpose="batch").data]

    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "sdk-round-trip"},
    )
    assert batch.status == "validating"
    done = _wait(client, batch.id)
    assert done.status == "completed", done
    assert done.metadata == {"job": "sdk-round-trip"}
    assert done.request_counts.total == 7
    assert done.request_counts.completed == 6
    assert done.request_counts.failed == 1

    output = _lines(client, done.output_file_id)
    errors = _lines(client, done.error_file_id)
    ids = sorted(l["custom_id"] for l in output + errors)
    assert ids == sorted(r["custom_id"] for r in requests), "every custom_id exactly once"
    assert [e["custom_id"] for e in errors] == ["bad"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "top_p"

    for line in output:
        i = int(line["custom_id"].split("-")[1])
        assert line["response"]["status_code"] == 200 and line["error"] is None
        direct = client.chat.completions.create(
            model=model, messages=user(questions[i]), max_tokens=10, temperature=0
        )
        body = line["response"]["body"]
        assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content
        assert body["usage"]["completion_tokens"] == direct.usage.completion_tokens

    assert done.id in [b.id for b in client.batches.list(limit=100).data]
    client.files.delete(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_cancelling_a_batch_keeps_finished_lines(client: openai.OpenAI, model: str) -> None:
    requests = [
        {
            "custom_id": f"long-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": model, "prompt": f"Chapter {i}.", "max_tokens": 96, "ignore_eos": True},
        }
        for i in range(200)
    ]
    uploaded = client.files.create(file=("long.jsonl", io.BytesIO(_jsonl(requests))), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = _wait(client, batch.id, timeout=60)
    assert done.status == "cancelled"
    assert 1 <= done.request_counts.completed < 200
    assert len(_lines(client, done.output_file_id)) == done.request_counts.completed


def test_batch_errors_map_to_sdk_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_does_not_exist")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-does-not-exist", endpoint="/v1/completions", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    uploaded = client.files.create(file=("x.jsonl", io.BytesIO(b"not json\n")), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
        )
    # Not JSONL: the batch is created, then fails validation with OpenAI-style errors.
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
    )
    done = _wait(client, batch.id, timeout=30)
    assert done.status == "failed"
    assert done.errors.data[0].code == "invalid_json_line"
    assert done.errors.data[0].line == 1


def test_embeddings_batch_matches_direct_embeddings() -> None:
    root = os.environ["SPINDLE_EMBED_BASE_URL"].rstrip("/")
    name = os.environ["SPINDLE_EMBED_MODEL_NAME"]
    client = make_client(root)
    texts = ["A cat sits on the mat.", "Rust is a systems language.", "Paris is in France."]
    requests = [
        {"custom_id": f"e-{i}", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": name, "input": t}}
        for i, t in enumerate(texts)
    ]
    uploaded = client.files.create(file=("emb.jsonl", io.BytesIO(_jsonl(requests))), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    done = _wait(client, batch.id, timeout=60)
    assert done.status == "completed", done
    output = {l["custom_id"]: l for l in _lines(client, done.output_file_id)}
    assert sorted(output) == ["e-0", "e-1", "e-2"]
    for i, text in enumerate(texts):
        got = output[f"e-{i}"]["response"]["body"]["data"][0]["embedding"]
        want = client.embeddings.create(model=name, input=text).data[0].embedding
        assert len(got) == len(want)
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-6
        assert math.isclose(sum(a * a for a in got), 1.0, rel_tol=1e-4)
    client.close()
