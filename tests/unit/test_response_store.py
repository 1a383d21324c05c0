"""The Responses API's store: bounded by bytes (least recently used evicted), per tenant, chains of turns."""

from __future__ import annotations

import json

from service.serving.response_store import ResponseStore, as_input


def _response(rid: str, text: str = "ok") -> dict:
    return {"id": rid, "output": [
        {"type": "reasoning", "id": "rs_1", "content": [{"type": "reasoning_text", "text": "hmm"}]},
        {"type": "message", "id": "msg_o", "role": "assistant", "content": [{"type": "output_text", "text": text}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{}",
         "status": "completed"}]}


def _items(text: str) -> list[dict]:
    return [{"type": "message", "id": f"msg_{text}", "role": "user", "content": [{"type": "input_text", "text": text}]}]


def _size(rid: str, text: str) -> int:
    return len(json.dumps(_response(rid))) + len(json.dumps(_items(text)))


def test_output_goes_back_as_input_without_reasoning():
    assert as_input(_response("r")["output"]) == [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}]


def test_a_chain_resolves_oldest_first_and_breaks_when_a_link_is_gone():
    store = ResponseStore(10**6)
    store.put("t", _response("r1", "one"), _items("a"), None)
    store.put("t", _response("r2", "two"), _items("b"), "r1")
    texts = [item["content"][0]["text"] for item in store.conversation("t", "r2") if item["type"] == "message"]
    assert texts == ["a", "one", "b", "two"]
    assert store.delete("t", "r1") and store.conversation("t", "r2") is None
    assert store.get("t", "r2") is not None  # the response itself is still there to retrieve


def test_tenants_see_only_their_own():
    store = ResponseStore(10**6)
    store.put("acme", _response("r1"), _items("a"), None)
    assert store.get("globex", "r1") is None and store.conversation("globex", "r1") is None
    assert not store.delete("globex", "r1") and store.get("acme", "r1") is not None


def test_bounded_by_bytes_least_recently_used_first():
    one = _size("r1", "a")
    store = ResponseStore(one * 2 + one // 2)  # room for two
    store.put("t", _response("r1"), _items("a"), None)
    store.put("t", _response("r2"), _items("a"), None)
    store.get("t", "r1")  # r1 used last: r2 goes first
    store.put("t", _response("r3"), _items("a"), None)
    assert store.get("t", "r2") is None and store.get("t", "r1") and store.get("t", "r3")
    assert len(store) == 2 and store.bytes == 2 * one
    assert not store.put("t", _response("big", "x" * store.max_bytes), _items("a"), None)  # alone over the bound
    assert len(store) == 2 and store.bytes == 2 * one
    store.put("t", _response("r3"), _items("a"), None)  # stored again under its id: replaced, not counted twice
    assert len(store) == 2 and store.bytes == 2 * one


def test_zero_bytes_stores_nothing():
    store = ResponseStore(0)
    assert not store.enabled and not store.put("t", _response("r"), _items("a"), None) and len(store) == 0


def test_held_event_streams_count_against_the_bound_and_go_with_their_response():
    one = _size("r1", "a")
    store = ResponseStore(one * 4)
    dropped = []
    store.on_drop = dropped.append
    for rid in ("r1", "r2", "r3"):
        store.put("t", _response(rid), _items("a"), None)
    assert store.hold("r1", one)  # r1's finished stream: r1 is now the newest, and four entries' worth is used
    assert store.bytes == 4 * one and dropped == []
    assert store.hold("r2", one)  # makes room by evicting the oldest (r3), never r2 itself
    assert dropped == ["r3"] and store.bytes == 4 * one and store.get("t", "r3") is None
    store.put("t", _response("r2"), _items("a"), None)  # its final status replaces it: the hold stays
    assert store.get("t", "r2").held == one and dropped == ["r3"]
    store.release("r2")  # its stream expired
    assert store.get("t", "r2").held == 0 and store.bytes == 3 * one
    assert not store.hold("r2", store.max_bytes)  # would not fit even alone: nothing counted, nothing evicted
    assert not store.hold("absent", 1)
    assert store.delete("t", "r1") and dropped == ["r3", "r1"]  # deleted: its held stream goes too
    assert store.bytes == store.get("t", "r2").size
