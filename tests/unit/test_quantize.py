"""The quantization seams that need no engine: the fingerprint chain, the platform check, the missing tool."""

from __future__ import annotations

import json

import pytest

from artifacts.manifest import PROVENANCE, BaseFingerprint, base_fingerprint
from service.engine.quantization import check_quantization

B = BaseFingerprint(model="base", config_sha256="c" * 64, weights_sha256="b" * 64)
OTHER = BaseFingerprint(model="other", config_sha256="c" * 64, weights_sha256="o" * 64)


def derived(source: BaseFingerprint, weights: str, transform: str = "quantize", scheme: str = "w8a8"):
    return BaseFingerprint(model=f"{source.model}-{scheme}", config_sha256="q" * 64, weights_sha256=weights * 64,
                           derived_from=source, transform=transform, scheme=scheme)


def test_an_adapter_of_b_is_accepted_on_b_and_on_quantizations_of_b():
    assert B.mismatch(B) is None
    assert B.mismatch(derived(B, "1")) is None
    assert B.mismatch(derived(derived(B, "1", scheme="fp8"), "2")) is None  # two steps down the chain


def test_an_adapter_of_b_is_refused_elsewhere_with_the_chain_named():
    assert "another base model (config" not in (B.mismatch(OTHER) or "")
    assert "weights fingerprint bbbbbbbbbbbb != served oooooooooooo" in B.mismatch(OTHER)
    message = B.mismatch(derived(OTHER, "1"))
    assert "a w8a8 quantization of other (weights oooooooooooo)" in message
    assert "not a quantization of the adapter's base" in message


def test_a_merge_starts_a_new_model():
    merged = derived(B, "m", transform="merge", scheme=None)
    assert B.mismatch(merged) is not None
    assert B.mismatch(derived(merged, "1")) is not None  # a quantization of the merge is not one of B


def test_base_fingerprint_reads_the_provenance(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / PROVENANCE).write_text(json.dumps({"derived_from": B.model_dump(), "transform": "quantize",
                                                   "scheme": "w4a16"}))
    found = base_fingerprint(str(tmp_path))
    assert found.lineage()[1].weights_sha256 == B.weights_sha256 and found.scheme == "w4a16"
    assert B.mismatch(found) is None
    (tmp_path / PROVENANCE).write_text("{not json")
    with pytest.raises(ValueError, match="provenance.json is unreadable"):
        base_fingerprint(str(tmp_path))


def _model(tmp_path, method: str | None):
    config = {"quantization_config": {"quant_method": method}} if method else {}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_cpu_runs_compressed_tensors_and_refuses_in_flight_methods(tmp_path):
    check_quantization(_model(tmp_path, "compressed-tensors"), None, on_cpu=True)
    check_quantization(_model(tmp_path, None), None, on_cpu=True)
    for flag in ("bitsandbytes", "fp8"):
        with pytest.raises(ValueError, match=f"--quantization {flag}: .*needs a CUDA GPU"):
            check_quantization(_model(tmp_path, None), flag, on_cpu=True)
        check_quantization(_model(tmp_path, None), flag, on_cpu=False)  # a GPU runs them
    with pytest.raises(ValueError, match="does not match the checkpoint's compressed-tensors"):
        check_quantization(_model(tmp_path, "compressed-tensors"), "awq", on_cpu=True)


def test_quantize_without_llm_compressor_says_where_it_lives(tmp_path):
    pytest.importorskip("vllm")  # the serving environment, where llm-compressor is not installed
    from trainer.quantize import quantize

    with pytest.raises(ValueError, match="make quantize-env"):
        quantize(str(tmp_path), str(tmp_path / "out"), "w8a8")
    with pytest.raises(ValueError, match="unknown scheme 'int3'"):
        quantize(str(tmp_path), str(tmp_path / "out"), "int3")
