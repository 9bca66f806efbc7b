"""spindle's KV-cache events, consumed the way vLLM's consumers do: a pyzmq SUB socket on the
PUB endpoint, payloads decoded by msgspec into structs declared as vLLM declares them
(vllm/distributed/kv_events.py: field order, tags, defaults), block hashes recomputed with
vLLM's sha256_cbor (cbor2, canonical) from the tokens the server's /tokenize returns, and a
DEALER socket asking the replay endpoint for what was missed.

Run by scripts/test-kv-events.sh, which starts `spindle serve` with a small KV cache and passes
its addresses in SPINDLE_BASE_URL, SPINDLE_KV_PUB, SPINDLE_KV_REPLAY, SPINDLE_KV_TOPIC and the
hash seed in SPINDLE_KV_SEED.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.request
from typing import Any, Optional, Union

import cbor2
import msgpack
import msgspec
import pytest
import zmq

BASE = os.environ["SPINDLE_BASE_URL"].rstrip("/")
PUB = os.environ["SPINDLE_KV_PUB"]
REPLAY = os.environ["SPINDLE_KV_REPLAY"]
TOPIC = os.environ["SPINDLE_KV_TOPIC"].encode()
SEED = os.environ["SPINDLE_KV_SEED"]
BLOCK = 16


# vLLM's event structs (msgspec, vllm/distributed/kv_events.py) in the form vllm-router decodes:
# the batch array_like, the events tagged structs (maps with "type").
class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: Optional[int] = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[Union[bytes, int]]
    parent_block_hash: Optional[Union[bytes, int]]
    token_ids: list[int]
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str]
    lora_name: Optional[str] = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[Union[bytes, int]]
    medium: Optional[str]


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[Union[BlockStored, BlockRemoved, AllBlocksCleared]]


DECODER = msgspec.msgpack.Decoder(type=KVEventBatch)


def sha256_cbor(value: Any) -> bytes:
    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


NONE_HASH = sha256_cbor(SEED)


def block_hashes(tokens: list[int]) -> list[bytes]:
    """vLLM's hash chain of the full blocks of `tokens` (hash_block_tokens, no extra keys)."""
    out, parent = [], NONE_HASH
    for i in range(len(tokens) // BLOCK):
        parent = sha256_cbor((parent, tuple(tokens[i * BLOCK:(i + 1) * BLOCK]), None))
        out.append(parent)
    return out


def post(path: str, body: dict) -> dict:
    req = urllib.request.Request(BASE + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def tokens(prompt: str) -> list[int]:
    return post("/tokenize", {"prompt": prompt})["tokens"]


def complete(prompt: str) -> None:
    post("/v1/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0})


@pytest.fixture(scope="module")
def sub():
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.SUB)
    s.connect(PUB)
    s.setsockopt(zmq.SUBSCRIBE, TOPIC)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    time.sleep(0.5)  # the PUB side learns of the subscription asynchronously
    yield s
    s.close(linger=0)


received: list[tuple[int, bytes]] = []


def next_batch(sub) -> KVEventBatch:
    topic, seq, payload = sub.recv_multipart()
    assert topic == TOPIC
    assert len(seq) == 8
    received.append((int.from_bytes(seq, "big"), payload))
    return DECODER.decode(payload)


def drain(sub, quiet: float = 0.5) -> list[KVEventBatch]:
    out = []
    sub.setsockopt(zmq.RCVTIMEO, int(quiet * 1000))
    try:
        while True:
            out.append(next_batch(sub))
    except zmq.Again:
        pass
    finally:
        sub.setsockopt(zmq.RCVTIMEO, 5000)
    return out


PROMPT_A = "In a quiet village by the sea, an old lighthouse keeper kept a journal of every ship " * 3


def test_stored_blocks_carry_vllm_hashes_and_tokens(sub):
    ids = tokens(PROMPT_A)
    assert len(ids) >= 3 * BLOCK
    complete(PROMPT_A)
    batch = next_batch(sub)
    raw = msgpack.unpackb(received[-1][1], raw=False)
    # [ts, events, dp rank]; each event a map, the tag first, fields in declared order.
    assert len(raw) == 3 and raw[2] == 0
    assert list(raw[1][0]) == ["type", "block_hashes", "parent_block_hash", "token_ids",
                               "block_size", "lora_id", "medium", "lora_name"]
    assert abs(batch.ts - time.time()) < 60
    stored = [e for e in batch.events if isinstance(e, BlockStored)]
    assert len(stored) == 1, batch
    e = stored[0]
    full = len(ids) // BLOCK
    assert e.block_size == BLOCK
    assert e.parent_block_hash is None, "the prompt's first block has no parent"
    assert e.token_ids == ids[: full * BLOCK]
    assert e.block_hashes == block_hashes(ids)[:full]
    assert e.medium == "GPU" and e.lora_id is None


def test_a_prefix_hit_stores_only_the_new_blocks(sub):
    drain(sub)
    ids_a = tokens(PROMPT_A)
    extended = PROMPT_A + " and the storms that came each winter from the north."
    ids = tokens(extended)
    assert ids[: len(ids_a) - 1] == ids_a[: len(ids_a) - 1]
    complete(extended)
    stored = [e for b in drain(sub) for e in b.events if isinstance(e, BlockStored)]
    expected = block_hashes(ids)
    new = [h for e in stored for h in e.block_hashes]
    known = block_hashes(ids_a)
    assert not set(new) & set(known[: len(ids_a) // BLOCK - 1]), "cached blocks are not stored again"
    assert set(new) <= set(expected)
    for e in stored:
        first = expected.index(e.block_hashes[0])
        assert e.parent_block_hash == (expected[first - 1] if first else None)


def test_eviction_is_reported_and_replay_returns_every_batch(sub):
    drain(sub)
    stored_hashes: set[bytes] = set()
    removed: set[bytes] = set()
    # The server has 24 KV blocks: these prompts cannot all stay cached.
    for i in range(8):
        complete(f"Story {i}: " + "a winding road through hills and fields and rivers " * 6)
        for b in drain(sub, quiet=0.3):
            for e in b.events:
                if isinstance(e, BlockStored):
                    stored_hashes.update(e.block_hashes)
                elif isinstance(e, BlockRemoved):
                    removed.update(e.block_hashes)
    assert removed, "evictions are reported"
    everything = {h for _, p in received for e in DECODER.decode(p).events
                  if isinstance(e, BlockStored) for h in e.block_hashes}
    assert removed <= everything, "only blocks that were stored are removed"

    # Sequence numbers seen by the subscriber are consecutive.
    seqs = [s for s, _ in received]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))

    # Replay from the first sequence number we saw: the same payloads, then the end marker.
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.connect(REPLAY)
    dealer.send_multipart([b"", seqs[0].to_bytes(8, "big")])
    replayed = []
    while True:
        empty, seq, payload = dealer.recv_multipart()
        assert empty == b""
        n = int.from_bytes(seq, "big", signed=True)
        if n == -1:
            assert payload == b""
            break
        replayed.append((n, payload))
    dealer.close(linger=0)
    assert replayed[: len(received)] == received
