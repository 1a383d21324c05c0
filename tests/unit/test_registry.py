"""Adapter root (names, revisions, path safety), load-time checks, and the registry's lifecycle logic.

The registry is driven here with the protocol's stand-in (tests/fakes.py), to pin down single-flight loading and
revision retirement exactly; tests/e2e/test_adapters.py runs the same paths against the real engine.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from artifacts.manifest import BaseFingerprint
from service.adapters.registry import AdapterRegistry, collect_adapters
from service.adapters.store import AdapterRefused, AdapterStore, inspect_adapter, natural_key, split_model
from service.engine.base import NoEvents
from service.engine.vllm_engine import adapter_rank, engine_rank_limit
from service.errors import BadRequest, ModelNotFound
from service.settings import ServiceSettings
from tests.fakes import FakeEngine

LM = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
VISUAL = "base_model.model.model.visual.blocks.0.attn.qkv"


def _adapter(path, r=8, prefixes=(LM,), manifest=None, config=None):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(config or {"r": r, "rank_pattern": {"x": 2 * r}}))
    tensors = {}
    for prefix in prefixes:
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, 16)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(16, r)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    if manifest is not None:
        (path / "manifest.json").write_text(json.dumps(manifest))
    return path


# -- store ------------------------------------------------------------------------------------------

def test_collect_from_dir_and_pairs(tmp_path):
    _adapter(tmp_path / "root" / "a")
    _adapter(tmp_path / "root" / "b" / "v1")
    (tmp_path / "root" / "not-an-adapter").mkdir()
    other = _adapter(tmp_path / "c")
    found = collect_adapters([f"c={other}"], tmp_path / "root")
    assert list(found) == ["a", "b", "c"]
    assert found["b"].endswith("v1")


@pytest.mark.parametrize("pair", ["../x=/tmp", "a b=/tmp", "=/tmp"])
def test_bad_names_refused(tmp_path, pair):
    with pytest.raises(ValueError):
        collect_adapters([pair.replace("/tmp", str(_adapter(tmp_path / "ok")))], None)


def test_path_without_adapter_refused(tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json"):
        collect_adapters([f"a={tmp_path}"], None)


def test_settings_validate_pairs():
    with pytest.raises(ValueError):
        ServiceSettings(adapters=["no-equals-sign"])
    assert ServiceSettings(model="/m/qwen").base_name == "qwen"


def test_revisions_newest_is_natural_order(tmp_path):
    for rev in ("v2", "v10", "v9"):
        _adapter(tmp_path / "root" / "x" / rev)
    store = AdapterStore(tmp_path / "root")
    assert store.find("x")[0] == "v10"
    assert store.find("x", "v2")[1] == (tmp_path / "root" / "x" / "v2").resolve()
    with pytest.raises(ModelNotFound):
        store.find("x", "v3")
    assert sorted(["2026-01-10", "2026-01-02"], key=natural_key) == ["2026-01-02", "2026-01-10"]
    flat = _adapter(tmp_path / "root" / "flat")
    rev, path = store.find("flat")
    assert len(rev) == 12 and path == flat.resolve()


def test_partial_folders_are_never_served_or_listed(tmp_path):
    """`REV.partial` (and `NAME.partial`) are outputs still being written; `v8.partial` sorts above `v8`."""
    _adapter(tmp_path / "root" / "x" / "v8")
    _adapter(tmp_path / "root" / "x" / "v8.partial")
    _adapter(tmp_path / "root" / "y.partial")
    _adapter(tmp_path / "root" / "z" / "v1.partial")
    store = AdapterStore(tmp_path / "root")
    assert store.find("x")[0] == "v8" and list(store.revisions("x")) == ["v8"]
    assert store.names() == ["x"]
    for model in ("x@v8.partial", "y.partial", "z"):
        with pytest.raises(ModelNotFound):
            store.find(*split_model(model))
    with pytest.raises(ValueError, match="partial"):
        collect_adapters([f"w.partial={tmp_path / 'root' / 'x' / 'v8'}"], None)


@pytest.mark.parametrize("model", ["../x", "/etc/passwd", "a/../../b", "x@../v1", "x@", "..", ".hidden", "a b",
                                   "x@v1/../../etc"])
def test_unsafe_names_are_not_found(tmp_path, model):
    _adapter(tmp_path / "root" / "x" / "v1")
    store = AdapterStore(tmp_path / "root")
    with pytest.raises(ModelNotFound):
        name, rev = split_model(model)
        store.find(name, rev)


def test_symlinks_out_of_the_root_are_refused(tmp_path):
    outside = _adapter(tmp_path / "outside" / "evil")
    root = tmp_path / "root"
    _adapter(root / "ok" / "v1")
    os.symlink(outside, root / "evil")  # a name pointing out of the root
    os.symlink(outside, root / "ok" / "v2")  # a revision pointing out of the root
    os.symlink(root / "ok" / "v1", root / "alias")  # inside the root: fine
    store = AdapterStore(root)
    with pytest.raises(ModelNotFound):
        store.find("evil")
    assert store.find("ok")[0] == "v1"
    assert store.find("alias")[0]
    assert "evil" not in store.names()


# -- load-time checks ---------------------------------------------------------------------------------

def _inspect(path, **kw):
    args = dict(max_rank=16, tower_lora=False, base_fingerprint=BaseFingerprint(config_sha256="aa" * 32))
    return inspect_adapter("t", path, **{**args, **kw})


def test_inspect_reads_rank_and_targets(tmp_path):
    meta = _inspect(_adapter(tmp_path / "a", r=8))
    assert meta.rank == 8 and meta.targets == {"language": ["q_proj"]}


def test_inspect_refusals_name_their_reason(tmp_path):
    with pytest.raises(AdapterRefused, match="rank 32 exceeds the engine's max_lora_rank 16"):
        _inspect(_adapter(tmp_path / "big", r=32))
    with pytest.raises(AdapterRefused, match=r"vision-tower/merger modules \(qkv\)"):
        _inspect(_adapter(tmp_path / "vis", prefixes=(LM, VISUAL)))
    assert _inspect(tmp_path / "vis", tower_lora=True).targets["vision"] == ["qkv"]
    with pytest.raises(AdapterRefused, match="another base model"):
        _inspect(_adapter(tmp_path / "other", manifest={"base": {"config_sha256": "bb" * 32}}))
    assert _inspect(_adapter(tmp_path / "same", manifest={"base": {"config_sha256": "aa" * 32}})).manifest
    truncated = _adapter(tmp_path / "trunc")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterRefused, match="corrupt"):
        _inspect(truncated)
    garbage = _adapter(tmp_path / "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterRefused, match="corrupt"):
        _inspect(garbage)
    bad_config = _adapter(tmp_path / "cfg")
    (bad_config / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterRefused, match="adapter_config.json is unreadable"):
        _inspect(bad_config)
    (bad_config / "adapter_config.json").write_text("{}")
    (bad_config / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterRefused, match="missing"):
        _inspect(bad_config)


def test_ranks(tmp_path):
    assert adapter_rank(_adapter(tmp_path / "a", r=8)) == 16
    assert engine_rank_limit([8, 16], None) == 16
    assert engine_rank_limit([9], None) == 16
    assert engine_rank_limit([], None) == 16
    assert engine_rank_limit([8], 100) == 128
    with pytest.raises(BadRequest):
        adapter_rank(tmp_path)


# -- registry lifecycle -------------------------------------------------------------------------------

async def _no_golden_samples(adapter, path, manifest):
    return []


def _registry(root, **kw):
    return AdapterRegistry("base", FakeEngine(), golden_check=_no_golden_samples, events=NoEvents(),
                           store=AdapterStore(root), preload="none", **kw)


def test_concurrent_first_requests_load_once(tmp_path):
    _adapter(tmp_path / "x" / "v1")
    reg = _registry(tmp_path)

    async def run():
        revs = await asyncio.gather(*(reg.resolve("x") for _ in range(10)))
        assert all(r is revs[0] for r in revs)
        assert await reg.resolve("base") is None
        with pytest.raises(ModelNotFound):
            await reg.resolve("absent")
        with pytest.raises(ModelNotFound):  # a tenant that may not use it sees the same 404
            await reg.resolve("x", allowed=lambda name: False)

    asyncio.run(run())
    assert reg.engine.log == [("load", "x@v1")]


def test_hot_replace_retires_the_old_revision_after_its_requests(tmp_path):
    _adapter(tmp_path / "x" / "v1")
    reg = _registry(tmp_path)

    async def run():
        old = await reg.resolve("x")
        reg.acquire(old)  # a request in flight on v1
        _adapter(tmp_path / "x" / "v2")
        new = await reg.load("x")
        assert new.rev == "v2" and (await reg.resolve("x")) is new
        assert (await reg.resolve("x@v1")) is old  # still resident while its request runs
        await reg.settle()
        assert "x@v1" in reg.engine.loaded
        reg.release(old)
        await reg.settle()
        assert "x@v1" not in reg.engine.loaded and "x@v2" in reg.engine.loaded
        pinned = await reg.resolve("x@v1")  # pinning an old revision loads it without switching
        assert pinned.rev == "v1" and reg.active["x"] is new
        await reg.unload("x")
        await reg.settle()
        assert reg.engine.loaded == {} and reg.names() == []

    asyncio.run(run())
    log = reg.engine.log
    assert log[:4] == [("load", "x@v1"), ("load", "x@v2"), ("unload", "x@v1"), ("load", "x@v1")]
    assert sorted(log[4:]) == [("unload", "x@v1"), ("unload", "x@v2")]


def test_changed_files_are_unavailable_until_the_loaded_bytes_are_back(tmp_path):
    path = _adapter(tmp_path / "x" / "v1")
    weights = path / "adapter_model.safetensors"
    loaded = weights.read_bytes()
    reg = _registry(tmp_path)
    asyncio.run(reg.resolve("x"))
    reg.check_files()
    assert reg.unavailable() == {}
    weights.write_bytes(loaded[:100])
    reg.check_files()
    assert "changed on disk" in reg.unavailable()["x"]
    os.utime(weights, ns=(1, 1))  # touched again, still other bytes
    reg.check_files()
    assert "changed on disk" in reg.unavailable()["x"]
    weights.write_bytes(loaded)  # the loaded bytes, under a new mtime: the same adapter
    os.utime(weights, ns=(2, 2))
    reg.check_files()
    assert reg.unavailable() == {}
    weights.rename(tmp_path / "aside")
    reg.check_files()
    assert "changed on disk" in reg.unavailable()["x"]  # a file missing is a change
    (tmp_path / "aside").rename(weights)
    reg.check_files()
    assert reg.unavailable() == {}
    path.rename(tmp_path / "gone")
    reg.check_files()
    assert "folder was removed" in reg.unavailable()["x"]


def test_a_refused_revision_keeps_the_previous(tmp_path):
    _adapter(tmp_path / "x" / "v1")
    reg = _registry(tmp_path)

    async def run():
        first = await reg.resolve("x")
        _adapter(tmp_path / "x" / "v2", r=64)
        with pytest.raises(AdapterRefused, match="rank 64"):
            await reg.load("x")
        assert reg.active["x"] is first and (await reg.resolve("x")) is first

    asyncio.run(run())


def test_adapter_labels_are_bounded():
    from service.metrics import AdapterLabels

    labels = AdapterLabels(2)
    assert [labels.register(n) for n in ("a", "b", "c", "a")] == ["a", "b", "other", "a"]
    assert [labels(n) for n in (None, "a", "c", "never-seen")] == ["base", "a", "other", "other"]


def test_engine_events_label_revisions_by_adapter_name():
    from service.metrics import Metrics

    m = Metrics(max_adapter_labels=1)
    m.adapter_event("load", "x@v1", 0.01)  # first named: x
    m.adapter_event("load", "y@v1", 0.01)  # beyond the bound: other
    m.scheduler_state(3, 1, 0.5, {"x@v1": 1, "x@v2": 1, "y@v1": 1})
    m.request_queued("x@v2", 0.2)
    m.request_queued(None, 0.1)
    text = m.exposition(engine_unfinished=4).decode()
    assert 'vlora_engine_adapter_requests_running{adapter="x"} 2.0' in text
    assert 'vlora_engine_adapter_requests_running{adapter="other"} 1.0' in text
    assert 'vlora_queue_wait_seconds_count{adapter="x"} 1.0' in text
    assert 'vlora_queue_wait_seconds_count{adapter="base"} 1.0' in text
    assert "vlora_engine_requests_unfinished 4.0" in text and "vlora_adapters_loaded 2.0" in text
