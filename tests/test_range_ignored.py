"""A server that ignores Range: the first ranged read of a shard finds it from the answer's
status line and headers, before the body is read, and the run stops with one line. Checked
with 100 MB shards through the trainer's loader (one worker), whose peak memory stays
bounded, and against answers that get a range subtly wrong."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ROOT, subprocess_env
from object_store import free_port
from test_faults import wait_for

from data_prep.plan import PrepParams
from data_prep.synthetic import SyntheticSpec, generate
from data_prep.writer import run as prepare
from shards.store import Store, StoreError

SAMPLE_PADDING = 1 << 20  # bytes after each JPEG's end (decoders ignore them): 100 samples make a 100 MB shard
# The loader worker's peak resident memory may pass what it had at its start by this much: its
# event loop thread, HTTP session and reader threads, and the headers of its first reads; well
# under one 100 MB shard, so that one whole shard's body in memory fails it.
WORKER_GROWTH_BOUND_MB = 64

# Run as a script: loader workers may be started from a fork server, which imports it anew.
READ_THROUGH_THE_LOADER = r"""
import functools, json, multiprocessing, sys
from pipeline.data.batches import make_loader
from pipeline.data.prepared import RemoteOptions, open_prepared
from pipeline.data.webdataset_input import TrainStream
from shards.store import StoreError, error_line

def status_mb(field, pid="self"):  # VmRSS: resident now; VmHWM: the peak
    lines = open(f"/proc/{pid}/status").read().splitlines()
    return next(int(line.split()[1]) for line in lines if line.startswith(field + ":")) / 1024

def start_counting(trainer_init, started_with, worker_id):  # in the worker, before it reads
    trainer_init(worker_id)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM starts again from VmRSS (Linux)
    started_with.value = status_mb("VmRSS")

if __name__ == "__main__":
    data = open_prepared(sys.argv[1], RemoteOptions(retry_s=5))
    stream = TrainStream(data.train, batch_size=4, batches_per_epoch=2, rank=0, world_size=1, seed=0, image_size=32,
                         crop=None, baked=False, shuffle_buffer=0, eval_resize=36, num_classes=data.num_classes)
    loader = make_loader(stream, workers=1, pin_memory=False)
    started_with = loader.multiprocessing_context.Value("d", 0.0)  # shared with the worker at its start
    loader.worker_init_fn = functools.partial(start_counting, loader.worker_init_fn, started_with)
    batches = iter(loader)
    try:
        next(batches)
        error = "no error"
    except StoreError as exc:
        error = error_line(exc)
    worker, = multiprocessing.active_children()  # alive until the loader is dropped
    print(json.dumps({"started_with_mb": started_with.value, "peak_mb": status_mb("VmHWM", worker.pid),
                      "error": error, "shard": data.train[0].url}))
"""


def answers(url: str) -> bool:
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def hundred_mb_shard(tmp_path_factory) -> Path:
    """A prepared dataset whose one training shard is 100 MB (100 small JPEGs, each followed by
    1 MB of zeros: a sparse file to write, so cheap to make)."""
    root = tmp_path_factory.mktemp("big-shard")
    images = root / "images"
    generate(images, SyntheticSpec(num_classes=2, train_per_class=50, val_per_class=1, min_side=40, max_side=64))
    for jpeg in (images / "train").rglob("*.JPEG"):
        with open(jpeg, "r+b") as f:
            f.truncate(f.seek(0, 2) + SAMPLE_PADDING)
    prepare(PrepParams(train=str(images / "train"), val=str(images / "val"), val_labels=str(images / "val_labels.txt"),
                       class_names=str(images / "LOC_synset_mapping.txt"), shard_size=100), root / "shards")
    return root / "shards"


@pytest.mark.slow
def test_a_loader_worker_stops_at_the_first_read_with_its_memory_bounded(hundred_mb_shard, tmp_path):
    """Python's http.server answers every ranged GET with the whole file (200). The trainer's
    loader, one worker: one line naming the shard, and the worker's peak memory within
    WORKER_GROWTH_BOUND_MB of what it had at its start (it used to read whole shards first)."""
    assert (hundred_mb_shard / "train-000000.tar").stat().st_size > 100e6
    script = tmp_path / "read_through_the_loader.py"
    script.write_text(READ_THROUGH_THE_LOADER)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(hundred_mb_shard)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(f"{url}/manifest.json"), timeout=30, what="http.server")
        result = subprocess.run([sys.executable, str(script), url], cwd=ROOT, env=subprocess_env(),
                                capture_output=True, text=True, timeout=300)
    finally:
        server.kill()
        server.wait()
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.splitlines()[-1])
    print(f"loader worker: {seen['started_with_mb']:.0f} MB at its start, peak {seen['peak_mb']:.0f} MB: {seen['error']}")
    assert seen["shard"] in seen["error"] and "ignores range requests (Range: bytes=...)" in seen["error"]
    assert seen["peak_mb"] - seen["started_with_mb"] < WORKER_GROWTH_BOUND_MB


OBJECT = bytes(range(256)) * 4096  # 1 MiB


class Misranging(BaseHTTPRequestHandler):
    """Answers a ranged GET of /NAME as NAME says, all with HTTP/1.0 (a body without
    Content-Length ends when the connection closes)."""

    def do_GET(self):
        a, b = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
        kind = self.path.strip("/")
        self.server.answers.append(kind)
        body = {"whole": OBJECT, "shifted": OBJECT[:b - a + 1], "unsized": OBJECT[a:]}[kind]
        self.send_response(200 if kind == "whole" else 206)
        if kind == "shifted":  # the right length, from the wrong place
            self.send_header("Content-Range", f"bytes 0-{b - a}/{len(OBJECT)}")
        if kind != "unsized":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def misranging_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Misranging)
    server.daemon_threads, server.answers = True, []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("kind", ["whole", "shifted", "unsized"])
def test_an_answer_that_is_not_the_range_asked_for_is_refused_at_once(misranging_server, kind):
    """A 200 with the whole object for a range past its start, a 206 from the wrong offset, a
    206 longer than the range: one line, not retried; the right bytes never replaced by others."""
    store = Store(f"http://127.0.0.1:{misranging_server.server_address[1]}", retry_s=5)
    with pytest.raises(StoreError, match=rf"/{kind}: .*it ignores range requests \(Range: bytes=\.\.\.\)"):
        store.read_range(kind, 1000, 3000)
    assert misranging_server.answers == [kind] and store.stats.retries == 0


def test_a_whole_object_that_is_the_range_asked_for_is_read(misranging_server):
    """A server without ranges still serves a read of a whole small object from its start."""
    store = Store(f"http://127.0.0.1:{misranging_server.server_address[1]}", retry_s=5)
    assert store.read_range("whole", 0, len(OBJECT)) == OBJECT
    assert store.read_range("whole", 0, len(OBJECT) + 100) == OBJECT  # the object ends before the range does
