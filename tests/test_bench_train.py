"""The training benchmark's smoke mode (tiny sizes on the CPU): every row is measured and the
table's ratios are those of its own figures. It checks the harness, not the speed."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env


@pytest.mark.slow
def test_smoke_mode_prints_every_row_with_consistent_figures(tmp_path):
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_train.py"), "--smoke", "--json", str(out)],
                            cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = {row["name"].split(" (")[0]: row for row in report["rows"]}
    assert list(rows) == ["torchvision reference", "googlenet_bn", "googlenet", "end to end"]
    reference, device_resident = rows["torchvision reference"], rows["googlenet_bn"]
    for name, row in rows.items():
        assert row["images_per_sec"] > 0 and row["tflops"] > 0, name
        assert row["vs_reference"] == pytest.approx(row["images_per_sec"] / reference["images_per_sec"])
        assert row["of_device_resident"] == pytest.approx(row["images_per_sec"] / device_resident["images_per_sec"])
        assert name in result.stdout and f"{row['images_per_sec']:.1f}" in result.stdout
    # The same network and image size: about the same FLOPs per image (counted, not assumed).
    per_image = {name: row["tflops"] / row["images_per_sec"] for name, row in rows.items()}
    assert per_image["googlenet_bn"] == pytest.approx(per_image["torchvision reference"], rel=0.05)
    assert per_image["end to end"] == pytest.approx(per_image["googlenet_bn"])
    end_to_end = rows["end to end"]
    assert 0 <= end_to_end["data_wait"] < 1
    assert report["device"] == "CPU" and all(row["mfu"] is None for row in rows.values())  # no stated peak
    assert "n/a" in result.stdout
