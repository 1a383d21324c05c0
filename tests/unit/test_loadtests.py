"""Load-test maths and planning on known inputs."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from loadtests.report import compare
from loadtests.scenario import Scenario, ScenarioError, plan
from loadtests.stats import RequestRecord, meets_slo, parse_slo, percentile, summarize_all


@pytest.mark.parametrize("values", [[1.0], [3.0, 1.0, 2.0], list(range(1, 101)), [0.5, 0.1, 0.9, 0.3]])
@pytest.mark.parametrize("p", [0, 50, 90, 99, 100])
def test_percentile_matches_numpy(values, p):
    assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))
    assert percentile([], p) is None


def _rec(i, model, ttft, n_tokens, e2e, status=200, error=None, cold=False, extra=None):
    start = float(i)
    times = [start + ttft + k * (e2e - ttft) / max(n_tokens - 1, 1) for k in range(n_tokens)]
    return RequestRecord(index=i, model=model, cold=cold, start=start, status=status, error=error, ttft=ttft,
                         token_times=times, end=start + e2e, output_tokens=n_tokens, extra=extra)


def test_summary_on_known_timings():
    records = [_rec(0, "a", 0.1, 11, 1.1), _rec(1, "a", 0.3, 11, 2.3), _rec(2, "b", 0.2, 5, 0.6, cold=True),
               _rec(3, "b", 0.0, 0, 0.0, status=429, error="overloaded")]
    s = summarize_all(records, wall_s=10.0, slo={"ttft": 0.25, "tpot": 0.15})
    assert s["requests"] == 4 and s["successful"] == 3
    assert s["error_rate"] == 0.25 and s["errors"] == {"overloaded": 1}
    assert s["requests_per_s"] == pytest.approx(0.3)
    assert s["output_tokens_per_s"] == pytest.approx(2.7)
    assert s["ttft"]["p50"] == pytest.approx(0.2)
    # TPOT: (1.1-0.1)/10 = 0.1, (2.3-0.3)/10 = 0.2, (0.6-0.2)/4 = 0.1
    assert s["tpot"]["p50"] == pytest.approx(0.1) and s["tpot"]["mean"] == pytest.approx(0.4 / 3)
    assert s["itl"]["p50"] == pytest.approx(0.1)
    assert s["cold_ttft"]["n"] == 1 and s["cold_ttft"]["p50"] == pytest.approx(0.2)
    # Goodput: request 0 (ttft 0.1, tpot 0.1) and 2 (0.2, 0.1) meet the SLO; 1 fails ttft and tpot; 3 failed.
    assert s["goodput_requests_per_s"] == pytest.approx(0.2) and s["slo_attainment"] == 0.5
    assert s["per_adapter"]["a"]["requests"] == 2 and s["per_adapter"]["b"]["error_rate"] == 0.5
    assert not meets_slo(records[1], {"ttft": 0.25})


def test_parse_slo():
    assert parse_slo(["ttft=0.5", "tpot=0.05"]) == {"ttft": 0.5, "tpot": 0.05}
    with pytest.raises(ValueError, match="KEY=SECONDS"):
        parse_slo(["latency=1"])


def test_poisson_inter_arrivals():
    s = Scenario(mode="open", rate=10.0, max_requests=4000, duration_s=1000, seed=3)
    times = [p.at for p in plan(s, ["a"])]
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(0.1, rel=0.05)
    assert statistics.pstdev(gaps) / mean == pytest.approx(1.0, rel=0.07)  # exponential: CV = 1
    assert plan(s, ["a"])[100].at == times[100]  # deterministic from the seed


def test_adapter_mixes():
    adapters = ["a", "b", "c", "d"]
    zipf = [p.model for p in plan(Scenario(mix="zipf", zipf_s=1.2, max_requests=4000, seed=1), adapters)]
    counts = [zipf.count(a) for a in adapters]
    assert counts == sorted(counts, reverse=True) and counts[0] > 2 * counts[3]
    rr = [p.model for p in plan(Scenario(mix="round_robin", max_requests=8), adapters)]
    assert rr == adapters * 2
    weighted = [p.model for p in plan(Scenario(mix="weights", weights=[0, 0, 1, 0], adapters=adapters,
                                               max_requests=50), adapters)]
    assert set(weighted) == {"c"}
    cold = plan(Scenario(cold_burst=2, cold_adapters=["x", "y"], max_requests=6, mix="uniform"), adapters)
    assert [p.model for p in cold[:2]] == ["x", "y"] and all(p.cold for p in cold[:2])
    assert not any(p.cold or p.model in ("x", "y") for p in cold[2:])


def test_output_lengths_from_choices_leave_the_rest_of_the_plan_as_it_was():
    """max_tokens_choices (a length-matched control's lengths) draws every output length from the list; models,
    prompts and images are the plan's without it, so the control is the same traffic but for its lengths."""
    base = Scenario(mix="uniform", max_requests=400, seed=5)
    choices = [44, 50, 50, 51, 56]
    matched = Scenario(mix="uniform", max_requests=400, seed=5, max_tokens_choices=choices)
    a, b = plan(base, ["x", "y"]), plan(matched, ["x", "y"])
    assert [(p.model, p.prompt, p.image_seed, p.images) for p in a] == \
        [(p.model, p.prompt, p.image_seed, p.images) for p in b]
    lengths = [p.max_tokens for p in b]
    assert set(lengths) == set(choices)
    assert lengths.count(50) == pytest.approx(400 * 2 / 5, rel=0.25)  # drawn as often as listed
    assert [p.max_tokens for p in plan(matched, ["x", "y"])] == lengths  # deterministic from the seed


@pytest.mark.parametrize("kw,needle", [
    ({"max_tokens_choices": [10, 0]}, "max_tokens_choices"),
    ({"mode": "burst"}, "mode must be"),
    ({"mix": "weights", "adapters": ["a", "b"], "weights": [1]}, "one weight per adapter"),
    ({"max_requests": 0}, "stop by itself"),
    ({"images": [{"size": 8}]}, "outside 16..4096"),
    ({"images": [{"format": "GIF"}]}, "PNG or JPEG"),
    ({"max_tokens": [10, 5]}, "max_tokens"),
    ({"cold_burst": 3}, "cold_adapters"),
])
def test_scenario_validation_is_clear(kw, needle):
    with pytest.raises(ScenarioError, match=needle):
        Scenario(**kw)


def test_scenario_yaml_unknown_key(tmp_path):
    (tmp_path / "s.yaml").write_text("rate: 2\nconcurrncy: 4\n")
    with pytest.raises(ScenarioError, match="concurrncy"):
        Scenario.from_yaml(tmp_path / "s.yaml")


def test_shipped_scenarios_load():
    from pathlib import Path

    for path in (Path(__file__).resolve().parents[2] / "loadtests" / "scenarios").glob("*.yaml"):
        assert Scenario.from_yaml(path).max_requests > 0


def test_requests_are_summarized_by_the_extra_they_carried():
    records = [_rec(0, "a", 0.1, 11, 1.1, extra="plain"), _rec(1, "a", 0.3, 11, 2.3, extra="tool"),
               _rec(2, "b", 0.2, 5, 0.6, extra="tool")]
    s = summarize_all(records, wall_s=10.0)
    assert set(s["per_extra"]) == {"plain", "tool"}
    assert s["per_extra"]["plain"]["requests"] == 1 and s["per_extra"]["plain"]["tpot"]["p50"] == pytest.approx(0.1)
    assert s["per_extra"]["tool"]["requests"] == 2 and s["per_extra"]["tool"]["ttft"]["p50"] == pytest.approx(0.25)
    assert "per_extra" not in summarize_all([_rec(0, "a", 0.1, 11, 1.1)], wall_s=1.0)  # no extras: no split


def test_compare_ratios():
    a = {"requests_per_s": 2.0, "ttft": {"p50": 0.1, "n": 5}, "per_adapter": {"x": {"requests_per_s": 1.0}}}
    b = {"requests_per_s": 3.0, "ttft": {"p50": 0.2, "n": 5}, "per_adapter": {"x": {"requests_per_s": 0.5}}}
    rows = {name: ratio for name, _, _, ratio in compare(a, b)}
    assert rows == {"requests_per_s": 1.5, "ttft.p50": 2.0, "x/requests_per_s": 0.5}


def test_progress_line_reports_counts_errors_and_ttft():
    import io

    from loadtests.cli import Progress

    out = io.StringIO()
    progress = Progress(stream=out, every_s=0.0)
    records = [RequestRecord(index=i, model="a", cold=False, start=0.0, status=200, ttft=0.1 * (i + 1),
                             output_tokens=10) for i in range(3)]
    records.append(RequestRecord(index=3, model="a", cold=False, start=0.0, status=429, error="overloaded"))
    progress(records, 8)
    line = out.getvalue()
    assert "4/8" in line and "err 1" in line and "TTFT p50 200 ms" in line and "[############............]" in line


def test_progress_is_plain_lines_off_a_terminal_and_a_bar_on_one():
    import io

    from loadtests.cli import Progress

    records = [RequestRecord(index=i, model="a", cold=False, start=0.0, status=200, ttft=0.1, output_tokens=4)
               for i in range(6)]
    log = io.StringIO()  # a CI log: not a terminal
    progress = Progress(stream=log)
    for n in range(1, 7):
        progress(records[:n], 6)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and log.getvalue().endswith("\n")
    assert lines[0].startswith("[####") and "1/6" in lines[0] and "6/6" in lines[-1]
    assert len(lines) == 2  # the first call and the last one; the others fall inside the 10 s period

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    progress = Progress(stream=tty, every_s=0.0)
    for n in range(1, 7):
        progress(records[:n], 6)
    progress.close()
    assert "\r" in tty.getvalue() and "6/6" in tty.getvalue() and "TTFT p50 100 ms" in tty.getvalue()


def test_feature_extras_are_planned_by_weight_and_merged_into_the_body(tmp_path):
    from loadtests.runner import request_body
    from loadtests.scenario import plan

    path = tmp_path / "s.yaml"
    path.write_text("max_requests: 40\nextras:\n  - {weight: 3, body: {logprobs: true}}\n"
                    "  - {weight: 1, body: {response_format: {type: json_object}}}\n")
    s = Scenario.from_yaml(path)
    planned = plan(s, ["a"])
    assert [p.extra for p in planned] == [p.extra for p in plan(s, ["a"])]  # deterministic from the seed
    assert 20 < sum(p.extra == 0 for p in planned) < 40 and any(p.extra == 1 for p in planned)
    logprobs = request_body(s, next(p for p in planned if p.extra == 0))
    constrained = request_body(s, next(p for p in planned if p.extra == 1))
    assert logprobs["logprobs"] and logprobs["ignore_eos"]
    assert constrained["response_format"] == {"type": "json_object"} and "ignore_eos" not in constrained
    with pytest.raises(ScenarioError, match="extras"):
        Scenario(extras=[{"weight": 0, "body": {}}])
