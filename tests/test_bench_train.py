"""The training benchmark's smoke mode (tiny sizes on the CPU) as the GPU report's smoke run runs
it: every row is measured and the table's ratios are those of its own figures. It checks the
harness, not the speed."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_smoke_mode_prints_every_row_with_consistent_figures(gpu_report_smoke):
    result, report_dir = gpu_report_smoke
    assert result.returncode == 0, result.stderr[-4000:]
    out = report_dir / "bench_train.json"
    assert out.is_file(), (report_dir / "logs" / "bench_train.err").read_text()[-4000:]
    stdout = (report_dir / "logs" / "bench_train.out").read_text()
    report = json.loads(out.read_text())
    rows = {row["name"].split(" (")[0]: row for row in report["rows"]}
    assert list(rows) == ["torchvision reference", "googlenet_bn", "googlenet", "end to end"]
    reference, device_resident = rows["torchvision reference"], rows["googlenet_bn"]
    for name, row in rows.items():
        assert row["images_per_sec"] > 0 and row["tflops"] > 0, name
        assert row["vs_reference"] == pytest.approx(row["images_per_sec"] / reference["images_per_sec"])
        assert row["of_device_resident"] == pytest.approx(row["images_per_sec"] / device_resident["images_per_sec"])
        assert name in stdout and f"{row['images_per_sec']:.1f}" in stdout
    # The same network and image size: about the same FLOPs per image (counted, not assumed).
    per_image = {name: row["tflops"] / row["images_per_sec"] for name, row in rows.items()}
    assert per_image["googlenet_bn"] == pytest.approx(per_image["torchvision reference"], rel=0.05)
    assert per_image["end to end"] == pytest.approx(per_image["googlenet_bn"])
    end_to_end = rows["end to end"]
    assert 0 <= end_to_end["data_wait"] < 1
    assert report["device"] == "CPU" and all(row["mfu"] is None for row in rows.values())  # no stated peak
    assert "n/a" in stdout
