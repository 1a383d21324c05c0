"""Stored responses of the Responses API: `store`, `previous_response_id`, and GET / DELETE
`/v1/responses/{id}` with its input items, held in this process's memory per tenant, bounded by bytes.

OpenAI stores a response unless the request says `store: false`; vLLM's server stores none unless an
environment variable is set, and then never evicts (its own warning says so). Here the store is on by
default (following OpenAI), bounded by `--responses-store-bytes` (the least recently used response is
evicted first; 0 turns storing off, and answers then say `store: false`), and a tenant sees only its own
responses: another tenant's id is the same 404 as an unknown one. Each entry holds its own input items and
output and the id it continued from, so an image sent in the first turn is held once however long the
conversation grows; a follow-up walks the chain, and a chain that lost a link (evicted or deleted) is refused
as not found. The store lives in one process: behind several replicas, route a conversation to one pod or
send the whole conversation as input.

Written by hand: a least-recently-used dict by bytes is a few lines, and cache libraries (cachetools'
LRUCache with getsizeof) would bound it but neither scope it per tenant nor walk a chain of entries.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass

logger = logging.getLogger("vlora.responses")


@dataclass
class Stored:
    owner: str
    response: dict  # the Response as answered
    items: list[dict]  # this turn's input items (each with an id), as input_items lists them
    previous: str | None  # the response this one continued
    size: int


def as_input(output: list[dict]) -> list[dict]:
    """A response's output items as the input items of the next turn: the message as an assistant turn,
    function calls as they are; reasoning items are not sent back (the chat templates of thinking models
    drop earlier turns' reasoning too)."""
    items = []
    for item in output:
        if item["type"] == "message":
            items.append({"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": part["text"]} for part in item["content"]]})
        elif item["type"] == "function_call":
            items.append({k: item[k] for k in ("type", "call_id", "name", "arguments")})
    return items


class ResponseStore:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, Stored] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def put(self, owner: str, response: dict, items: list[dict], previous: str | None) -> bool:
        """Keep a response; False when it alone is over the bound (then it is not kept)."""
        size = len(json.dumps(response)) + len(json.dumps(items))
        if size > self.max_bytes:
            logger.warning("response not stored: %d bytes, over --responses-store-bytes %d", size, self.max_bytes)
            return False
        self._drop(response["id"])
        while self.bytes + size > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[response["id"]] = Stored(owner, response, items, previous, size)
        self.bytes += size
        return True

    def get(self, owner: str, response_id: str) -> Stored | None:
        entry = self._entries.get(response_id)
        if entry is None or entry.owner != owner:
            return None
        self._entries.move_to_end(response_id)
        return entry

    def delete(self, owner: str, response_id: str) -> bool:
        if self.get(owner, response_id) is None:
            return False
        self._drop(response_id)
        return True

    def conversation(self, owner: str, response_id: str) -> list[dict] | None:
        """The input items a follow-up to `response_id` continues: every earlier turn's input and output, oldest
        first; None when the response, or any response it continued, is not (or no longer) stored."""
        turns, seen = [], set()
        next_id: str | None = response_id
        while next_id is not None:
            entry = self.get(owner, next_id)
            if entry is None or next_id in seen:
                return None
            seen.add(next_id)
            turns.append(entry.items + as_input(entry.response["output"]))
            next_id = entry.previous
        return [item for turn in reversed(turns) for item in turn]

    def _drop(self, response_id: str) -> None:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.bytes -= entry.size
