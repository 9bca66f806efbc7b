"""vLLM's connect form of --kv-events-config against libzmq (pyzmq): the server connects to a
SUB that binds, the way a central indexer runs. The server was started with nothing listening
and has served for a while (60 s in scripts/test-kv-events.sh); the SUB binds now, receives
events, is closed and bound again (an indexer restart), and receives events again.
Prints one 'N passed, N failed' line."""

import json
import os
import sys
import time
import urllib.request

import msgpack
import zmq

BASE = os.environ["SPINDLE_BASE_URL"]
ENDPOINT = os.environ["SPINDLE_KV_BIND"]


def complete(i):
    body = json.dumps({"prompt": f"Indexer round {i}: " + "tell me about lighthouses. " * 8, "max_tokens": 2}).encode()
    req = urllib.request.Request(BASE + "/v1/completions", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200


def receive_events(round_no):
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.bind(ENDPOINT)
    try:
        deadline = time.time() + 30
        i = 0
        while time.time() < deadline:
            complete(round_no * 1000 + i)
            i += 1
            if sub.poll(500):
                parts = sub.recv_multipart()
                assert len(parts) == 3, parts
                payload = msgpack.unpackb(parts[2], raw=False)
                events = payload[1] if isinstance(payload, list) else payload["events"]
                assert events, payload
                return True
        return False
    finally:
        sub.close()


passed = failed = 0
for round_no in (1, 2):
    if receive_events(round_no):
        passed += 1
    else:
        failed += 1
        print(f"round {round_no}: no KV events arrived", file=sys.stderr)
    time.sleep(0.5)
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
