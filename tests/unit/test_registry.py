"""Start adapters from NAME=PATH pairs and an adapter directory; model-name resolution."""

from __future__ import annotations

import pytest

from service.adapters.registry import AdapterRegistry, collect_adapters
from service.engine.base import AdapterInfo
from service.engine.vllm_engine import adapter_rank, engine_rank_limit
from service.errors import BadRequest, ModelNotFound
from service.settings import ServiceSettings


def _adapter(path, r=8):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(f'{{"r": {r}, "rank_pattern": {{"x": {2 * r}}}}}')
    return path


def test_collect_from_dir_and_pairs(tmp_path):
    _adapter(tmp_path / "root" / "a")
    _adapter(tmp_path / "root" / "b")
    (tmp_path / "root" / "not-an-adapter").mkdir()
    other = _adapter(tmp_path / "c")
    found = collect_adapters([f"c={other}"], tmp_path / "root")
    assert list(found) == ["a", "b", "c"]


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


def test_ranks(tmp_path):
    assert adapter_rank(_adapter(tmp_path / "a", r=8)) == 16
    assert engine_rank_limit([8, 16], None) == 16
    assert engine_rank_limit([9], None) == 16
    assert engine_rank_limit([], None) == 16
    assert engine_rank_limit([8], 100) == 128
    with pytest.raises(BadRequest):
        adapter_rank(tmp_path)


class _Engine:
    def adapters(self):
        return [AdapterInfo(name="a", path="/x", rank=8, engine_id=1)]


def test_resolution():
    reg = AdapterRegistry("base", _Engine())
    assert reg.resolve("base") is None and reg.resolve("a") == "a"
    with pytest.raises(ModelNotFound):
        reg.resolve("b")


def test_adapter_labels_are_bounded():
    from service.metrics import AdapterLabels

    labels = AdapterLabels(2)
    assert [labels.register(n) for n in ("a", "b", "c", "a")] == ["a", "b", "other", "a"]
    assert [labels(n) for n in (None, "a", "c", "never-seen")] == ["base", "a", "other", "other"]
