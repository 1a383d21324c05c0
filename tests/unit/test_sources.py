"""Datasets as people have them: every format and image encoding, built here, read through `datasets`, mapped to
the chat format, and collated to the same tensors as the project's own JSONL of the same samples."""

from __future__ import annotations

import base64
import io
import json

import pytest

from tests.images import shape_image
from trainer.data import ChatCollator, ChatRecords, DataError, load_dataset_file, open_image, scan
from trainer.sources import SourceError, open_rows

QUESTION, ANSWER = "What color is the shape?", "red"


def png(color: str = "red", size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    shape_image(color, size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(png("red"))
    (tmp_path / "img" / "blue.png").write_bytes(png("blue", (96, 64)))
    return tmp_path


def hub_table(n: int = 3):
    """The hub's VLM SFT layout: placeholders in `messages`, the images (bytes) in an `images` column."""
    import datasets

    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "images": datasets.List(datasets.Image()),
    })
    messages = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}]
    return datasets.Dataset.from_dict({"messages": [messages] * n, "images": [[{"bytes": png(), "path": None}]] * n},
                                      features=features)


def reference_batch(folder, tiny_processor):
    """The project's own JSONL of the same sample, collated."""
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/red.png"},
                                                        {"type": "text", "text": QUESTION}]},
                           {"role": "assistant", "content": ANSWER}]}
    (folder / "ref.jsonl").write_text(json.dumps(record) + "\n")
    return ChatCollator(tiny_processor)(load_dataset_file(folder / "ref.jsonl"))


def assert_same_batch(records, folder, tiny_processor):
    want = reference_batch(folder, tiny_processor)
    got = ChatCollator(tiny_processor)(records[:1])
    for key in ("input_ids", "labels", "pixel_values", "image_grid_thw"):
        assert got[key].tolist() == want[key].tolist(), key


def test_parquet_with_embedded_image_bytes_in_the_hub_layout(folder, tiny_processor):
    hub_table().to_parquet(str(folder / "train.parquet"))
    rows = open_rows(str(folder / "train.parquet"))
    found = scan(rows, processor=tiny_processor)
    assert found.format == "messages" and found.records == 3 and not found.problems
    assert found.images == {1: 3} and found.duplicates == 2 and len(found.lengths) == 3
    records = list(ChatRecords(rows, found.format))
    assert isinstance(records[0]["messages"][0]["content"][0]["image"], bytes)  # not decoded until collated
    assert_same_batch(records, folder, tiny_processor)


def test_arrow_file_save_to_disk_folder_and_hub_layout_folder_with_splits(folder, tiny_processor):
    import datasets

    table = hub_table()
    datasets.DatasetDict({"train": table, "validation": hub_table(1)}).save_to_disk(str(folder / "saved"))
    assert len(open_rows(str(folder / "saved"))) == 3 and len(open_rows(str(folder / "saved"), "validation")) == 1
    arrow = next((folder / "saved" / "train").glob("*.arrow"))
    assert len(open_rows(str(arrow))) == 3
    hub = folder / "hub" / "data"  # laid out as a hub dataset: data/SPLIT-*.parquet
    hub.mkdir(parents=True)
    table.to_parquet(str(hub / "train-00000-of-00002.parquet"))
    table.to_parquet(str(hub / "train-00001-of-00002.parquet"))
    hub_table(2).to_parquet(str(hub / "validation-00000-of-00001.parquet"))
    rows = open_rows(str(folder / "hub"))
    assert len(rows) == 6 and len(open_rows(str(folder / "hub"), "validation")) == 2
    assert len(open_rows(str(hub / "train-*.parquet"))) == 6  # a glob, and a list of files
    assert len(open_rows(f"{hub / 'train-00000-of-00002.parquet'},{hub / 'validation-00000-of-00001.parquet'}")) == 5
    assert rows.where(4).endswith("train-00001-of-00002.parquet, record 2")  # shard and record named
    with pytest.raises(SourceError, match="no split 'test'"):
        open_rows(str(folder / "hub"), "test")
    assert_same_batch(list(ChatRecords(rows, "messages")), folder, tiny_processor)


def test_llava_sharegpt_and_qa_layouts_map_onto_the_same_chat(folder, tiny_processor):
    llava = [{"id": "1", "image": "img/red.png",
              "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": ANSWER}]}]
    (folder / "llava.json").write_text(json.dumps(llava))
    sharegpt = {"images": ["img/red.png", "img/blue.png"], "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": f"<image>\n{QUESTION}"},
        {"from": "gpt", "value": ANSWER}, {"from": "human", "value": "<image> And this one?"},
        {"from": "gpt", "value": "blue"}]}
    (folder / "sharegpt.jsonl").write_text(json.dumps(sharegpt) + "\n")
    (folder / "qa.jsonl").write_text(json.dumps({"image_path": "img/red.png", "question": QUESTION,
                                                 "answer": ANSWER}) + "\n")
    for name, fmt in (("llava.json", "llava"), ("qa.jsonl", "qa")):
        found = scan(open_rows(str(folder / name)))
        assert found.format == fmt and not found.problems, name
        assert_same_batch(load_dataset_file(folder / name), folder, tiny_processor)
    chat = load_dataset_file(folder / "sharegpt.jsonl")[0]["messages"]
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant"]
    assert [p["image"].rsplit("/", 1)[-1] for m in chat for p in m["content"] if p["type"] == "image"] == \
        ["red.png", "blue.png"]
    batch = ChatCollator(tiny_processor)([{"messages": chat}])
    assert batch["image_grid_thw"].shape[0] == 2  # multi-turn, two images, in order


@pytest.mark.parametrize("encoding", ["path", "data_uri", "bytes", "image_value"])
def test_every_image_encoding_collates_to_the_same_pixels(folder, tiny_processor, encoding):
    import datasets

    data = png()
    if encoding == "bytes":  # raw bytes in a binary column (the qa layout, as parquet)
        datasets.Dataset.from_list([{"image": data, "question": QUESTION, "answer": ANSWER}]).to_parquet(
            str(folder / "d.parquet"))
    elif encoding == "image_value":  # a datasets Image value
        features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                      "answer": datasets.Value("string")})
        datasets.Dataset.from_dict({"image": [{"bytes": data, "path": None}], "question": [QUESTION],
                                    "answer": [ANSWER]}, features=features).to_parquet(str(folder / "d.parquet"))
    else:
        ref = "img/red.png" if encoding == "path" else "data:image/png;base64," + base64.b64encode(data).decode()
        (folder / "d.jsonl").write_text(json.dumps({"messages": [
            {"role": "user", "content": [{"type": "image", "image": ref}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": ANSWER}]}) + "\n")
    records = load_dataset_file(folder / ("d.jsonl" if encoding in ("path", "data_uri") else "d.parquet"))
    assert_same_batch(records, folder, tiny_processor)


def test_image_urls_are_fetched_under_the_services_address_policy():
    from artifacts.media import MediaError

    # Addresses the policy refuses: refused by the check, before any connection is made.
    for url in ("http://10.1.2.3/a.png", "http://127.0.0.2:9/a.png"):
        with pytest.raises(MediaError, match="non-public"):
            open_image(url)


def test_bad_layouts_and_sources_are_named(folder):
    (folder / "odd.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    found = scan(open_rows(str(folder / "odd.jsonl")))
    assert found.problems and "unknown record shape" in found.problems[0] and "prompt" in found.problems[0]
    (folder / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SourceError, match="broken.parquet: cannot be read as parquet"):
        open_rows(str(folder / "broken.parquet"))
    with pytest.raises(SourceError, match="no file matches"):
        open_rows(str(folder / "shards-*.parquet"))
    markers = {"image": "img/red.png", "conversations": [{"from": "human", "value": "<image><image> two?"},
                                                        {"from": "gpt", "value": "no"}]}
    (folder / "markers.jsonl").write_text(json.dumps(markers) + "\n")
    with pytest.raises(DataError, match="more <image> markers than images"):
        load_dataset_file(folder / "markers.jsonl")


def test_video_parts_are_collated_with_frames_sampled_by_the_processor(folder, tiny_processor):
    from tests.videos import moving_circle_mp4

    (folder / "clip.mp4").write_bytes(moving_circle_mp4(frames=16, fps=8))
    record = {"messages": [{"role": "user", "content": [{"type": "video", "video": "clip.mp4"},
                                                        {"type": "text", "text": "Where does it move?"}]},
                           {"role": "assistant", "content": "right"}]}
    (folder / "v.jsonl").write_text(json.dumps(record) + "\n")
    found = scan(open_rows(str(folder / "v.jsonl")), processor=tiny_processor)
    assert not found.problems and found.videos == {1: 1}
    records = load_dataset_file(folder / "v.jsonl")
    slow = ChatCollator(tiny_processor, video_fps=1.0)(records)
    fast = ChatCollator(tiny_processor, video_fps=4.0)(records)
    assert "pixel_values_videos" in slow and slow["video_grid_thw"][0, 0] < fast["video_grid_thw"][0, 0]
    labels = slow["labels"][0][slow["labels"][0] != -100].tolist()
    assert tiny_processor.tokenizer.decode(labels) == "right<|im_end|>"
    (folder / "gone.jsonl").write_text(json.dumps({**record, "messages": [
        {"role": "user", "content": [{"type": "video", "video": "gone.mp4"}]}, record["messages"][1]]}) + "\n")
    assert any("video" in p and "missing" in p for p in scan(open_rows(str(folder / "gone.jsonl"))).problems)
