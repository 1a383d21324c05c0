"""Data benchmark: how fast the trainer opens, checks and loads a large parquet dataset with embedded images.

    .venv/bin/python bench/data_bench.py [--records 100000] [--out bench/results/datasets]

Builds a synthetic parquet set in the hub's VLM layout (`messages` with an image placeholder, an `images`
column of PNG bytes: 128x128 shapes, each record its own question), then measures on this machine:
opening it (datasets' Arrow cache built, then reused), `validate`'s pass without a processor (every record
mapped and checked, every image header verified) and with one (token lengths, images counted), reading the
stream, and loading training batches (records mapped, images decoded, the processor run, labels masked)
through a torch DataLoader. Prints a table of records/s last and writes it with the raw figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(path: Path, records: int, seed: int = 0) -> float:
    import random

    import datasets

    from trainer.demo_data import COLORS, SHAPES, draw_sample

    rng = random.Random(seed)
    colors = list(COLORS)
    pool = []
    for i in range(64):
        buf = io.BytesIO()
        draw_sample(colors[i % len(colors)], SHAPES[i % len(SHAPES)], rng, 128).save(buf, format="PNG")
        pool.append((colors[i % len(colors)], buf.getvalue()))
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "images": datasets.List(datasets.Image()),
    })

    def rows():
        for i in range(records):
            color, png = pool[i % len(pool)]
            yield {"messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                             {"type": "text", "text": f"Record {i}: what color?"}]},
                                {"role": "assistant", "content": [{"type": "text", "text": color}]}],
                   "images": [{"bytes": png, "path": None}]}

    started = time.perf_counter()
    datasets.Dataset.from_generator(rows, features=features).to_parquet(str(path))
    return time.perf_counter() - started


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--token-records", type=int, default=10_000, help="records scanned with the processor")
    parser.add_argument("--load-records", type=int, default=4_000, help="records loaded as training batches")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "datasets")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vlora-data-bench-"))
    os.environ["HF_DATASETS_CACHE"] = str(work / "cache")  # a cold Arrow cache (read when datasets is imported)

    from torch.utils.data import DataLoader
    from transformers import AutoProcessor

    from trainer.data import ChatCollator, ChatRecords, scan, streamed_chats
    from trainer.demo import ensure_tiny_model
    from trainer.sources import open_rows

    model = ensure_tiny_model(ROOT / "models")
    processor = AutoProcessor.from_pretrained(model)
    data = work / "train.parquet"
    build_s = build(data, args.records)
    size_mb = data.stat().st_size / 1e6
    rows, open_cold = timed(lambda: open_rows(str(data)))
    _, open_warm = timed(lambda: open_rows(str(data)))
    found, scan_s = timed(lambda: scan(rows))
    assert not found.problems and found.records == args.records, found.problems[:3]
    counted, token_s = timed(lambda: scan(rows, processor=processor, limit=args.token_records))
    stream = open_rows(str(data), streaming=True)
    n_stream, stream_s = timed(lambda: sum(1 for _ in streamed_chats(stream, "messages", 0, 1)))
    loader = DataLoader(ChatRecords(rows, "messages", list(range(args.load_records))), batch_size=16,
                        num_workers=args.workers, collate_fn=ChatCollator(processor))
    batches, load_s = timed(lambda: sum(1 for _ in loader))

    table = [
        ("build the parquet set (not the trainer)", args.records, build_s),
        ("open: parquet -> Arrow cache (first time)", args.records, open_cold),
        ("open again (cache reused)", args.records, open_warm),
        ("validate: map + check, image headers verified", args.records, scan_s),
        ("validate with --model: + token lengths", counted.records, token_s),
        ("stream: records mapped from the parquet stream", n_stream, stream_s),
        (f"load batches: decode + processor + labels ({args.workers} workers)", args.load_records, load_s),
    ]
    result = {"records": args.records, "parquet_mb": round(size_mb, 1), "cpu_count": os.cpu_count(),
              "rows": [{"step": name, "records": n, "seconds": round(s, 2), "records_per_s": round(n / s, 1)}
                       for name, n, s in table]}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    lines = [f"{args.records} records, parquet {size_mb:.0f} MB (128x128 PNG bytes embedded), {os.cpu_count()} CPUs",
             f"{'step':60s} {'records':>9s} {'seconds':>9s} {'records/s':>10s}"]
    lines += [f"{name:60s} {n:9d} {s:9.2f} {n / s:10.0f}" for name, n, s in table]
    text = "\n".join(lines)
    (args.out / "table.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
