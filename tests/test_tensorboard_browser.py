"""TensorBoard as a user sees it: a tiny run (2 epochs of 3 updates, validated after each),
``tensorboard --logdir`` on it, and Debian's Chromium, headless and driven by Playwright, on its
tabs. The charts must hold the run's points (the values the page loads from TensorBoard's data
API, against ``metrics.jsonl``), the Images tab the augmented batch, the HParams tab the run with
its recipe and final errors, the Custom Scalars tab train and validation error on one chart. On a
GPU, the memory scalars and their chart are read back from the event files.

Each browser test saves a screenshot (1280x800; HParams 1760x800, for the table's every column)
in its pytest temporary folder, or with ``GOOGLENET_SCREENSHOTS=DIR`` in DIR (the docs' are made
so, into ``docs/img/monitoring``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tiny_runs import free_port, train

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
VIEWPORT = {"width": 1280, "height": 800}
SCREENSHOTS_ENV = "GOOGLENET_SCREENSHOTS"
IMAGE_SIZE, BATCH, EPOCHS = 32, 32, 2  # tiny_data's 96 training images: 3 updates an epoch
RUN = [f"data.image_size={IMAGE_SIZE}", f"data.batch_size={BATCH}", f"schedule.epochs={EPOCHS}",
       "train.log_every_steps=3", "train.image_grid=true"]  # one log window per epoch, as metrics.jsonl has
# The charts a user looks for, and the key of metrics.jsonl holding the same value at the same step.
CHARTS = {"train/top1_error": "train_top1_error", "train/top5_error": "train_top5_error", "train/loss": "train_loss",
          "val/top1_error": "val_top1_error", "val/top5_error": "val_top5_error", "val/loss": "val_loss", "lr": "lr"}
TENSORBOARD_START_S = 120  # it answers in seconds; this only ends a test whose server never comes up


@pytest.fixture(scope="module")
def sync_playwright():
    if not CHROMIUM.is_file():
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} (bash scripts/setup.sh --test)")
    module = pytest.importorskip("playwright.sync_api", reason="needs playwright: pip install -e '.[test]'")
    return module.sync_playwright


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory) -> Path:
    return train(tiny_data, tmp_path_factory.mktemp("board"), "board", *RUN)


@pytest.fixture(scope="module")
def board(sync_playwright, run_dir):
    """(run directory, TensorBoard's URL): the tiny run, and ``tensorboard --logdir`` on it once it
    has read the run. Without a browser, neither is made."""
    port = free_port()
    executable = Path(sys.executable).with_name("tensorboard")
    with open(run_dir.parent / "tensorboard.log", "w+") as log:
        server = subprocess.Popen([str(executable), "--logdir", str(run_dir / "tensorboard"), "--host", "127.0.0.1",
                                   "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_loaded(url, server, log)
            yield run_dir, url
        finally:
            server.terminate()
            server.wait(timeout=30)


def wait_until_loaded(url: str, server: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + TENSORBOARD_START_S
    while True:
        log.seek(0)
        assert server.poll() is None, f"tensorboard exited with {server.returncode}:\n{log.read()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=10) as response:
                if "val/top1_error" in json.load(response).get(".", {}):
                    return
        except OSError:  # not listening yet
            pass
        assert time.monotonic() < deadline, \
            f"{url} did not show the run within {TENSORBOARD_START_S} s:\n{log.read()[-3000:]}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def page(sync_playwright, board):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport=VIEWPORT).new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    where = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path_factory.mktemp("screenshots"))
    where.mkdir(parents=True, exist_ok=True)
    return where


def screenshot(page, where: Path, name: str) -> None:
    path = where / f"{name}.png"
    page.screenshot(path=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def drawn(chart) -> None:
    """Wait until the chart (a card of the Scalars or Custom Scalars tab) has drawn a line through
    its points: they are fetched and drawn after the card appears."""
    chart.locator("path.line[d*='L']").first.wait_for(state="attached")


def show_whole_range(page) -> None:
    """Untick "Ignore outliers in chart scaling": with a few points the charts would cut some off."""
    box = page.locator("paper-checkbox").filter(has_text="Ignore outliers", visible=True)  # the tab's own
    if box.get_attribute("aria-checked") == "true":
        box.click()


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_scalar_charts_hold_the_runs_points(board, page, screenshots):
    run_dir, url = board
    wanted = "|".join(f"^{tag}$" for tag in CHARTS)
    page.goto(f"{url}/#scalars&tagFilter={urllib.parse.quote(wanted)}&_smoothingWeight=0")
    show_whole_range(page)
    for tag in CHARTS:  # the first card of each: the filter's, then its own category's
        drawn(page.locator("tf-scalar-card").filter(has_text=f"tag: {tag}").first)
    screenshot(page, screenshots, "scalars")
    expected = records(run_dir)
    assert [r["step"] for r in expected] == [3, 6]
    for tag, key in CHARTS.items():
        query = urllib.parse.urlencode({"run": ".", "tag": tag})
        points = page.request.get(f"{url}/data/plugin/scalars/scalars?{query}").json()  # [[wall time, step, value]]
        assert [step for _, step, _ in points] == [r["step"] for r in expected], tag
        assert [value for _, _, value in points] == pytest.approx([r[key] for r in expected], rel=1e-6, abs=1e-7), tag


def test_images_tab_shows_the_augmented_batch(board, page, screenshots):
    _, url = board
    page.goto(f"{url}/#images")
    page.get_by_text("tag: train/augmented_images", exact=True).wait_for()
    image = page.locator("img[src*='individualImage']").first
    image.wait_for()
    page.wait_for_function("image => image.complete && image.naturalWidth > 0", arg=image.element_handle())
    size = image.evaluate("image => [image.naturalWidth, image.naturalHeight]")
    # torchvision's make_grid: 8 images a row, 2 px around each
    assert size == [8 * (IMAGE_SIZE + 2) + 2, BATCH // 8 * (IMAGE_SIZE + 2) + 2]
    screenshot(page, screenshots, "images")


def test_hparams_lists_the_run_with_its_recipe_and_final_errors(board, page, screenshots):
    run_dir, url = board
    page.set_viewport_size({"width": 1760, "height": 800})  # the table's every column
    try:
        page.goto(f"{url}/#hparams")
        table = page.locator("tf-hparams-table-view")
        table.get_by_text("googlenet", exact=True).wait_for()
        screenshot(page, screenshots, "hparams")
        # vaadin-grid: each cell shows the element slotted into it
        header, row, *_ = table.locator("table").evaluate("""table => [...table.rows].map(row => [...row.cells].map(
            cell => [...(cell.querySelector('slot')?.assignedNodes({flatten: true}) ?? [])]
                    .map(node => node.textContent).join('').trim()))""")
    finally:
        page.set_viewport_size(VIEWPORT)
    shown = dict(zip(header, row))
    config, final = yaml.safe_load((run_dir / "config.yaml").read_text()), records(run_dir)[-1]
    assert shown["Trial ID"] == "."  # the run's folder, relative to --logdir
    assert shown["model.name"] == config["model"]["name"] == "googlenet"
    numbers = {"optim.lr": config["optim"]["lr"], "data.batch_size": BATCH, "data.image_size": IMAGE_SIZE,
               "schedule.epochs": EPOCHS, "val/top1_error": final["val_top1_error"],
               "val/top5_error": final["val_top5_error"]}
    for key, value in numbers.items():  # shown to 5 significant digits
        assert float(shown[key]) == pytest.approx(value, rel=1e-4, abs=1e-6), (key, shown)


def test_custom_scalars_put_train_and_validation_error_on_one_chart(board, page, screenshots):
    _, url = board
    page.goto(f"{url}/#custom_scalars&_smoothingWeight=0")
    show_whole_range(page)
    charts = page.locator("tf-custom-scalar-multi-line-chart-card")
    top1 = charts.filter(has_text="top-1 error").first
    top1.get_by_text("Matches (2)").wait_for()  # the chart's legend: the series its data hold
    top1.locator(".toggle-matches-button").click()
    for tag in ("train/top1_error", "val/top1_error"):
        top1.get_by_text(f"{tag} (.)").wait_for()  # (.): the run
    drawn(top1)
    drawn(charts.filter(has_text="waiting for data").first)
    screenshot(page, screenshots, "custom-scalars")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_memory_is_logged_and_charted(run_dir):
    """The run trained on the GPU: the allocator's memory beside the other throughput scalars, and
    a chart of it in the Custom Scalars layout."""
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for tag in ("memory/allocated_gib", "memory/max_reserved_gib", "memory/peak_gpu_gib"):
        points = events.Scalars(tag)
        assert [point.step for point in points] == [3, 6] and all(point.value > 0 for point in points), tag
    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts["GPU memory, GiB"] == ["^memory/allocated_gib$", "^memory/max_reserved_gib$", "^memory/peak_gpu_gib$"]
