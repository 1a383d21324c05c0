"""Dataset validation, conversion and loss masking on the tiny model's processor."""

from __future__ import annotations

import json

import pytest

from tests.images import shape_image
from trainer.data import IGNORE_INDEX, ChatCollator, DataError, load_dataset_file, scan, validate_records
from trainer.sources import open_rows


@pytest.fixture()
def image_dir(tmp_path):
    shape_image("red", (64, 64)).save(tmp_path / "red.png")
    shape_image("blue", (96, 64)).save(tmp_path / "blue.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return tmp_path


def user(text, *images):
    return {"role": "user", "content": [{"type": "image", "image": i} for i in images] + [{"type": "text", "text": text}]}


def test_every_problem_is_reported_with_its_record(image_dir):
    records = [
        {"messages": [user("ok?", "red.png"), {"role": "assistant", "content": "red"}]},      # 1: fine
        {"messages": [user("q", "missing.png"), {"role": "assistant", "content": "x"}]},      # 2: missing image
        {"messages": [user("q", "broken.png"), {"role": "assistant", "content": "x"}]},       # 3: unreadable
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},  # 4: role
        {"messages": [user("only a question", "red.png")]},                                   # 5: no assistant
        {"messages": [user("   "), {"role": "assistant", "content": "x"}]},                   # 6: empty text
        {"nothing": True},                                                                    # 7: no messages
    ]
    problems = validate_records(records, image_dir)
    joined = "\n".join(problems)
    for n, needle in [(2, "missing"), (3, "unreadable"), (4, "unknown role"), (5, "no assistant turn"),
                      (6, "empty text"), (7, "messages")]:
        assert any(p.startswith(f"record {n}") and needle in p for p in problems), (n, joined)
    assert not any(p.startswith("record 1:") or p.startswith("record 1,") for p in problems)


def test_pixel_limit(image_dir):
    shape_image("red", (400, 400)).save(image_dir / "big.png")
    records = [{"messages": [user("q", "big.png"), {"role": "assistant", "content": "x"}]}]
    assert any("pixel limit" in p for p in validate_records(records, image_dir, max_pixels=1000))


def test_load_refuses_invalid_file_with_the_report(image_dir):
    path = image_dir / "data.jsonl"
    path.write_text(json.dumps({"messages": [user("q", "missing.png"), {"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(DataError) as exc:
        load_dataset_file(path)
    assert "line 1" in str(exc.value) and "missing" in str(exc.value)


def test_json_array_and_jsonl_and_every_problem_beside_a_bad_line(image_dir):
    record = {"messages": [user("q", "red.png"), {"role": "assistant", "content": "a"}]}
    (image_dir / "a.json").write_text(json.dumps([record, record]))
    assert [len(r["messages"]) for r in load_dataset_file(image_dir / "a.json")] == [2, 2]
    lines = [json.dumps(record), "{oops", json.dumps({"messages": [user("q", "missing.png"),
                                                                    {"role": "assistant", "content": "a"}]}),
             json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}]}),
             json.dumps({"messages": [user("only a question", "red.png")]})]
    (image_dir / "b.jsonl").write_text("\n".join(lines) + "\n")
    found = scan(open_rows(str(image_dir / "b.jsonl")))
    assert found.records == 5
    for line, needle in [(2, "not valid JSON"), (3, "missing"), (4, "unknown role"), (5, "no assistant turn")]:
        assert any(p.startswith(f"line {line}:") and needle in p for p in found.problems), (line, found.problems)
    assert not any(p.startswith("line 1:") for p in found.problems)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset_file(image_dir / "none.jsonl")


@pytest.mark.parametrize("side", ["right", "left"])
def test_labels_cover_exactly_the_assistant_turns(image_dir, tiny_processor, side):
    path = image_dir / "chat.jsonl"
    records = [
        {"messages": [{"role": "system", "content": "Be brief."}, user("What color?", "red.png"),
                      {"role": "assistant", "content": "red"}, user("And this one?", "blue.png"),
                      {"role": "assistant", "content": "It is blue."}]},
        {"messages": [user("Color?", "red.png"), {"role": "assistant", "content": "a red circle"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    batch = ChatCollator(tiny_processor, padding_side=side)(load_dataset_file(path))
    tok = tiny_processor.tokenizer
    expected = [["red<|im_end|>", "It is blue.<|im_end|>"], ["a red circle<|im_end|>"]]
    assert batch["input_ids"].shape[0] == 2 and "pixel_values" in batch and "mm_token_type_ids" in batch
    for row, want in enumerate(expected):
        labels = batch["labels"][row].tolist()
        spans, current = [], []
        for token, label in zip(batch["input_ids"][row].tolist(), labels, strict=True):
            if label == IGNORE_INDEX:
                if current:
                    spans.append(current)
                    current = []
            else:
                assert label == token
                current.append(token)
        if current:
            spans.append(current)
        assert [tok.decode(s) for s in spans] == want


def test_blank_lines_are_no_records(image_dir):
    record = {"messages": [user("q", "red.png"), {"role": "assistant", "content": "a"}]}
    (image_dir / "gaps.jsonl").write_text(json.dumps(record) + "\n\n  \n" + json.dumps(record) + "\n")
    found = scan(open_rows(str(image_dir / "gaps.jsonl")))
    assert found.records == 2 and found.indices == [0, 3] and not found.problems
    assert [len(r["messages"]) for r in load_dataset_file(image_dir / "gaps.jsonl")] == [2, 2]
