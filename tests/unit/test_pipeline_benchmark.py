"""The inference benchmark runs end to end on a tiny bundle and reports every column (smoke test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference.benchmark import STAGES, main

pytestmark = pytest.mark.unit


def test_benchmark_smoke(tmp_path: Path, phantom_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.json"
    code = main(["--model", str(phantom_bundle), "--device", "cpu", "--batch", "1,2", "--repeats", "2",
                 "--size", "300", "--out", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    assert set(res["batch1_stage_s"]) == set(STAGES)
    assert res["assessed_share"] == 1.0
    assert res["decoded_into"] == "Pipeline.host_array"  # as the worker decodes
    assert res["stored_values"] is False  # the CPU pipeline (host path) declines them
    assert [t["batch"] for t in res["throughput"]] == [1, 2]
    for t in res["throughput"]:
        assert t["pipeline_ips"] > 0 and t["model_only_ips"] > 0 and t["pipeline_no_cam_ips"] > 0
        assert t["ratio_pipeline_model_cam"] == pytest.approx(t["pipeline_ips"] / t["model_cam_ips"])
        assert t["ratio_pipeline_no_cam_model_only"] == pytest.approx(
            t["pipeline_no_cam_ips"] / t["model_only_ips"]
        )
        # one ratio per round of each kind: the median of the rounds lies within their range
        assert t["rounds"] == (2 if t["batch"] == 1 else 5)  # --repeats at batch 1, at least 5 above
        for rounds in (t["ratio_rounds_model_cam"], t["ratio_rounds_no_cam"]):
            low, mid, high = rounds
            assert 0 < low <= mid <= high
    table = capsys.readouterr().out
    assert "decoded into Pipeline.host_array" in table
    assert "end_to_end" in table and "pipe/model" in table and "no CAM" in table and "round by round" in table


def test_benchmark_rejects_bad_batches(phantom_bundle: Path) -> None:
    with pytest.raises(ValueError, match="--batch"):
        main(["--model", str(phantom_bundle), "--device", "cpu", "--batch", "0", "--size", "300"])


def test_benchmark_takes_one_way_of_decoding(phantom_bundle: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--model", str(phantom_bundle), "--ordinary-arrays", "--float-pixels"])
    assert "exclude each other" in capsys.readouterr().err
