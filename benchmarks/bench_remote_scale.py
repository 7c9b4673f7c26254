"""Streaming ImageNet from an object store, simulated at full scale on one machine: what each
process reads at start-up, what each loader lane requests per epoch, whether every rank gets
the same number of batches, and what a loader worker holds in memory.

    python benchmarks/bench_remote_scale.py --src /tmp/imagenet-samples-100 [--ranks 64] [--workers 8]
                                            [--batch-size 32] [--shuffle-buffer 1000] [--processes 8]
                                            [--memory-samples 200] [--epoch 0]

(``tar -xf ../shared/data/imagenet-samples-100.tar -C /tmp`` gives that folder.) The dataset has
ILSVRC-2012's shape without its images: 1,281,167 training samples in 1,024 shards (1,251 or
1,252 each) and 50,000 validation samples in 64 shards (781 or 782 each). Only two shards are
real: the ``data_prep`` writer makes them from the 100 real JPEGs of ``--src`` cycled (1,252 and
1,251 samples, ~135 MB each: real ImageNet sizes, so that byte ranges, request counts and buffers
are ImageNet's); every one of the 1,088 listed names is a symbolic link to one of them, and its
index entries are those of the shard it repeats (a validation shard: its first 781 or 782). The
manifest (as ``shards.manifest.finalize`` writes it, 1,000 classes) and ``index.npz``
(``shards.dataset_index.pack``) describe that, and a range-capable HTTP server in a subprocess
on 127.0.0.1 serves the folder (``http://127.0.0.1:PORT/imagenet``), logging every request.

Measured:
- index.npz: bytes, and its arrays' bytes in memory;
- start-up of a training process: ``open_prepared`` in ``--processes`` fresh (forked) processes,
  one after another: wall time, requests and bytes (``Store.stats``, checked against the
  server's log), memory added;
- per epoch (``--epoch``), for all ranks x workers lanes, with ``TrainStream``'s cut of each lane's
  range into per-shard segments replicated and ``shards.remote.plan_reads`` over every segment:
  requests and MB per lane (min/median/max) and per rank; batches per rank (asserted equal for
  all ranks), and that the lanes tile the epoch without overlap; what the lanes request at once
  as an epoch starts (per lane, and per node of 8 ranks);
- memory of one loader worker (a forked process, as a DataLoader worker) after ``--memory-samples``
  samples of its lane through the real stream (``lane_samples`` from the server, decoded to 224 px
  crops): RSS, USS (its private pages) and what of it the dataset index is;
- two lanes read fully through the real stream (the longest and the one with the most planned
  requests): samples, requests and bytes against the plan, and against the server's log; the most
  private memory the process held, and the time to the lane's first sample.
"""
from __future__ import annotations

import argparse
import collections
import functools
import gc
import hashlib
import http.server
import json
import multiprocessing
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_prep.plan import PrepParams  # noqa: E402
from data_prep.writer import run as prepare  # noqa: E402
from imaging.specs import CropSpec  # noqa: E402
from pipeline.data.batches import decode_or_skip  # noqa: E402
from pipeline.data.prepared import Skipped, open_prepared  # noqa: E402
from pipeline.data.webdataset_input import TrainStream  # noqa: E402
from shards import remote as remote_module  # noqa: E402
from shards.dataset_index import INDEX_FILE, DatasetIndex, pack, read_shard_index  # noqa: E402
from shards.manifest import MANIFEST, load_manifest  # noqa: E402
from shards.remote import plan_reads  # noqa: E402

TRAIN_SAMPLES, TRAIN_SHARDS = 1_281_167, 1_024
VAL_SAMPLES, VAL_SHARDS = 50_000, 64
NUM_CLASSES = 1_000
PREFIX = "imagenet"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy


# -- the server ---------------------------------------------------------------------------------------------

def serve(root: Path, port: int, log_path: Path) -> None:
    """A threaded HTTP/1.1 server of ``root``: GET and HEAD, a single ``Range: bytes=a-b``, one log
    line per request (``METHOD PATH RANGE STATUS BYTES``)."""
    lock = threading.Lock()
    log = open(log_path, "a", buffering=1)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # the request log below instead
            pass

        def record(self, status: int, sent: int) -> None:
            with lock:
                log.write(f"{self.command} {self.path} {self.headers.get('Range', '-')} {status} {sent}\n")

        def do_HEAD(self) -> None:
            self.answer(body=False)

        def do_GET(self) -> None:
            self.answer(body=True)

        def answer(self, body: bool) -> None:
            path = (root / unquote(urlsplit(self.path).path).lstrip("/")).resolve()
            if not path.is_file():
                self.send_error(404)
                self.record(404, 0)
                return
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                start, stop, status = 0, size, 200
                wanted = self.headers.get("Range")
                if wanted:
                    match = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip())
                    if not match or not any(match.groups()):
                        self.send_error(416)
                        self.record(416, 0)
                        return
                    a, b = match.groups()
                    start, stop = (int(a), min(size, int(b) + 1) if b else size) if a else (max(0, size - int(b)), size)
                    if start >= stop:
                        self.send_error(416)
                        self.record(416, 0)
                        return
                    status = 206
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(stop - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
                self.end_headers()
                sent = 0
                if body:
                    self.wfile.flush()
                    sent = self.connection.sendfile(f, offset=start, count=stop - start)
                self.record(status, sent)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


class Server:
    """``serve`` in a subprocess (this script with ``--serve``), stopped by ``stop``."""

    def __init__(self, root: Path, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = log
        log.touch()
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(root), str(self.port), str(log)],
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit("the HTTP server did not start") from None
                time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/{PREFIX}"

    def mark(self) -> int:
        return self.log.stat().st_size

    def lines_since(self, mark: int) -> list[str]:
        time.sleep(0.1)  # a request's line is written just after its last byte
        with open(self.log, "rb") as f:
            f.seek(mark)
            return f.read().decode().splitlines()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# -- the simulated dataset ----------------------------------------------------------------------------------

def stage(src: Path, counts: list[int], dest: Path) -> None:
    """``sum(counts)`` hard links to the images of ``src`` cycled, in class folders (``<wnid>_...``)."""
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"{src}: no images")
    for i in range(sum(counts)):
        path = files[i % len(files)]
        relative = path.relative_to(src)
        cls = relative.parts[0] if len(relative.parts) > 1 else path.stem.split("_")[0]
        (dest / cls).mkdir(parents=True, exist_ok=True)
        os.link(path, dest / cls / f"{path.stem}_r{i // len(files)}{path.suffix}")


def sizes(total: int, parts: int) -> list[int]:
    return [total * (i + 1) // parts - total * i // parts for i in range(parts)]


def simulate(real: Path, root: Path) -> dict:
    """The 1,088 shard names as links to the two real shards of ``real``, with manifest.json and
    index.npz as ``finalize`` would write them for such a dataset; the manifest."""
    template = load_manifest(real)
    by_size = {s["samples"]: s for s in template["splits"]["train"]["shards"]}
    entries = {s["name"]: read_shard_index(real / s["index"]) for s in by_size.values()}
    root.mkdir(parents=True)
    records: dict[str, list[dict]] = {"train": [], "val": []}
    packed = []
    for split, total, count in (("train", TRAIN_SAMPLES, TRAIN_SHARDS), ("val", VAL_SAMPLES, VAL_SHARDS)):
        for i, samples in enumerate(sizes(total, count)):
            source = by_size[samples] if samples in by_size else max(by_size.values(), key=lambda s: s["samples"])
            name = f"{split}-{i:06d}.tar"
            (root / name).symlink_to((real / source["name"]).resolve())
            record = {"name": name, "samples": samples, "bytes": source["bytes"], "sha256": source["sha256"],
                      "index": f"{name}.idx"}
            if split == "train":
                record["group"] = 0
            records[split].append(record)
            packed.append((name, entries[source["name"]][:samples]))
    index = pack(packed)
    (root / INDEX_FILE).write_bytes(index)
    per_class = {split: sizes(total, NUM_CLASSES) for split, total in (("train", TRAIN_SAMPLES), ("val", VAL_SAMPLES))}
    splits = {split: {
        "shards": rs,
        "samples": sum(r["samples"] for r in rs),
        "bytes": sum(r["bytes"] for r in rs),
        "found": sum(r["samples"] for r in rs),
        "written": sum(r["samples"] for r in rs),
        "skipped": 0,
        "converted": 0,
        "augment_copies": 0,
        "class_counts": {str(c): n for c, n in enumerate(per_class[split])},
    } for split, rs in records.items()}
    manifest = {
        "index": {"name": INDEX_FILE, "bytes": len(index), "sha256": hashlib.sha256(index).hexdigest()},
        "format": "webdataset",
        "version": template["version"],
        "classes": [{"index": i, "id": f"n{10_000_000 + i:08d}", "name": f"class {i}"} for i in range(NUM_CLASSES)],
        "splits": splits,
        "totals": {k: sum(s[k] for s in splits.values()) for k in ("found", "written", "skipped", "samples", "bytes")},
        "skipped": [],
        "parameters": {**template["parameters"], "train": "/data/ILSVRC2012_img_train.tar",
                       "val": "/data/ILSVRC2012_img_val.tar", "shard_size": 1252},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False, sort_keys=True) + "\n")
    return manifest


# -- measurements -------------------------------------------------------------------------------------------

def in_child(function, *args):
    """``function(*args)`` in a forked process, as a DataLoader worker is forked: the arguments are
    inherited, not pickled (the index arrays stay shared with this process); its result."""
    context = multiprocessing.get_context("fork")
    results = context.SimpleQueue()

    def target():
        try:
            results.put((True, function(*args)))
        except BaseException as exc:
            results.put((False, f"{type(exc).__name__}: {exc}"))
            raise

    process = context.Process(target=target)
    process.start()
    ok, result = results.get()
    process.join()
    if not ok:
        raise RuntimeError(f"in the child process: {result}")
    return result


def open_once(url: str) -> dict:
    process = psutil.Process()
    before = process.memory_info().rss
    start = time.perf_counter()
    data = open_prepared(url)
    wall = time.perf_counter() - start
    stats = data.remote.store.stats
    return {"wall": wall, "requests": stats.requests, "bytes": stats.bytes, "rss": process.memory_info().rss - before,
            "index": data.remote.index.nbytes}


def memory(v) -> dict:
    return {"rss": v.rss, "uss": v.uss, "pss": v.pss}


def worker_memory(stream: TrainStream, lane: int, lanes: int, samples: int, index_bytes: int) -> dict:
    """A loader worker's memory before and after ``samples`` decoded samples of its lane (from the
    server, through the shuffle buffer), and how much of the index's pages it holds."""
    process = psutil.Process()
    start = memory(process.memory_full_info())
    stats = stream.shards[0].remote.store.stats
    before = (stats.requests, stats.bytes)  # the parent's, inherited
    taken = 0
    for i, item in enumerate(stream.lane_samples(lane, lanes)):
        decode_or_skip(item, lambda data: stream.decode(data, i), "train")
        taken += 1
        if taken == samples:
            break
    after = memory(process.memory_full_info())
    index_pages = resident_bytes_of(stream.shards[0].remote.index)
    return {"start": start, "after": after, "requests": stats.requests - before[0], "bytes": stats.bytes - before[1],
            "index_resident": index_pages, "index_bytes": index_bytes}


def resident_bytes_of(index: DatasetIndex) -> int:
    """Bytes of the index arrays' pages that this process has resident (from /proc/self/smaps ranges)."""
    spans = []
    for array in index.arrays.values():
        address = array.__array_interface__["data"][0]
        spans.append((address, address + array.nbytes))
    resident = 0
    with open("/proc/self/smaps") as f:
        region = None
        for line in f:
            head = line.split()
            if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head[0]):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                region = (lo, hi)
            elif head[0] == "Rss:" and region:
                lo, hi = region
                covered = sum(max(0, min(hi, b) - max(lo, a)) for a, b in spans)
                if covered:
                    resident += min(covered, int(head[1]) * 1024)  # at most what the region has resident
    return resident


def read_lane(stream: TrainStream, lane: int, lanes: int) -> dict:
    """Every sample of a lane through the real stream (not decoded); what the store did, and the
    most private memory (USS) the process held, sampled every 250 samples."""
    stats = stream.shards[0].remote.store.stats
    before = (stats.requests, stats.bytes)  # the parent's, inherited
    process = psutil.Process()
    start_uss = peak_uss = process.memory_full_info().uss
    items = skipped = 0
    start = time.perf_counter()
    first = None
    for item in stream.lane_samples(lane, lanes):
        if first is None:
            first = time.perf_counter() - start
        items += 1
        skipped += isinstance(item, Skipped)
        if items % 250 == 0:
            peak_uss = max(peak_uss, process.memory_full_info().uss)
    return {"items": items, "skipped": skipped, "requests": stats.requests - before[0],
            "bytes": stats.bytes - before[1], "wall": time.perf_counter() - start, "uss": peak_uss - start_uss,
            "first": first}


def spread(values) -> str:
    values = list(values)
    return f"{min(values):g} / {statistics.median(values):g} / {max(values):g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path)
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8, help="loader workers per rank (lanes)")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank (configs/imagenet_paper.yaml)")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="configs/imagenet_paper.yaml's")
    parser.add_argument("--processes", type=int, default=8, help="simulated processes whose start-up is measured")
    parser.add_argument("--memory-samples", type=int, default=200)
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--serve", nargs=3, metavar=("ROOT", "PORT", "LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]), Path(args.serve[2]))
        return
    if args.src is None:
        parser.error("--src is required")

    work = Path(tempfile.mkdtemp(prefix="bench_remote_scale_"))
    server = None
    try:
        began = time.perf_counter()
        counts = sorted(set(sizes(TRAIN_SAMPLES, TRAIN_SHARDS)), reverse=True)  # [1252, 1251]
        stage(args.src, counts, work / "images")
        prepare(PrepParams(train=str(work / "images"), shard_size=counts[0]), work / "real", workers=2)
        simulate(work / "real", work / "served" / PREFIX)
        real_mb = [s["bytes"] / 1e6 for s in load_manifest(work / "real")["splits"]["train"]["shards"]]
        server = Server(work / "served", work / "requests.log")
        prepared_s = time.perf_counter() - began

        # Start-up, in fresh processes (forked before this one opens anything).
        openings = []
        for _ in range(args.processes):
            mark = server.mark()
            row = in_child(open_once, server.url)
            row["logged"] = server.lines_since(mark)
            openings.append(row)

        data = open_prepared(server.url)
        remote = data.remote
        index = remote.index
        chunk = remote.chunk_bytes
        bpe = TRAIN_SAMPLES // (args.ranks * args.batch_size)

        def stream(rank: int) -> TrainStream:
            s = TrainStream(data.train, batch_size=args.batch_size, batches_per_epoch=bpe, rank=rank,
                            world_size=args.ranks, seed=0, image_size=224, crop=CropSpec(), baked=False,
                            shuffle_buffer=args.shuffle_buffer, eval_resize=256, num_classes=data.num_classes)
            s.set_epoch(args.epoch)
            return s

        # One loader worker's memory, in a process forked from this one (holding the index, as a rank).
        mem_rank, mem_lane = 0, 1
        gc.collect()
        worker = in_child(worker_memory, stream(mem_rank), mem_lane, args.workers, args.memory_samples,
                          index.nbytes)
        no_buffer = stream(mem_rank)
        no_buffer.shuffle_buffer = 0
        unbuffered = in_child(worker_memory, no_buffer, mem_lane, args.workers, args.memory_samples, index.nbytes)

        # The plan: TrainStream.lane_samples's cut, replicated, and plan_reads over every segment.
        entries = functools.lru_cache(maxsize=256)(remote.entries)
        order = stream(0).epoch_shards()
        interleave = stream(0).interleave_shards
        lanes: dict[tuple[int, int], dict] = {}
        batches_per_rank = []
        covered = []
        for rank in range(args.ranks):
            batches = [len(range(i, bpe, args.workers)) for i in range(args.workers)]
            batches_per_rank.append(sum(batches))
            for lane in range(args.workers):
                start = (rank * bpe + sum(batches[:lane])) * args.batch_size
                stop = start + batches[lane] * args.batch_size
                covered.append((start, stop))
                segment_reads, samples, offset = [], 0, 0  # the byte sizes of each segment's reads
                for shard in order:
                    first, last = max(offset, start) - offset, min(offset + shard.samples, stop) - offset
                    if first < last:
                        listed = entries(shard.name)
                        planned = plan_reads(listed, first, last, chunk)
                        segment_reads.append([listed[b - 1].offset + listed[b - 1].length - listed[a].offset
                                              for a, b in planned])
                        samples += last - first
                    offset += shard.samples
                # At its first sample a segment has submitted PREFETCH + 1 reads (the one sent when it opened,
                # then PREFETCH more as it takes that one); the lane opens interleave_shards segments at once.
                burst = sum(sum(r[:remote_module.PREFETCH + 1]) for r in segment_reads[:interleave])
                lanes[rank, lane] = {"requests": sum(map(len, segment_reads)), "bytes": sum(map(sum, segment_reads)),
                                     "samples": samples, "segments": len(segment_reads), "batches": batches[lane],
                                     "burst": burst}
        assert len(set(batches_per_rank)) == 1, f"ranks get different numbers of batches: {set(batches_per_rank)}"
        per_rank_samples = [sum(lanes[r, w]["samples"] for w in range(args.workers)) for r in range(args.ranks)]
        assert set(per_rank_samples) == {bpe * args.batch_size}, set(per_rank_samples)
        covered.sort()
        tiled = covered[0][0] == 0 and all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
        assert tiled, "lanes overlap or leave gaps"
        used = covered[-1][1]
        per_rank = [(sum(lanes[r, w]["requests"] for w in range(args.workers)),
                     sum(lanes[r, w]["bytes"] for w in range(args.workers))) for r in range(args.ranks)]
        total_requests = sum(v["requests"] for v in lanes.values())
        total_bytes = sum(v["bytes"] for v in lanes.values())

        # Two lanes read fully, each in a process forked from this one.
        entries.cache_clear()
        gc.collect()
        busiest = max(lanes, key=lambda k: (lanes[k]["requests"], lanes[k]["samples"]))
        longest = max(lanes, key=lambda k: (lanes[k]["samples"], -k[0], -k[1]))
        reads = {}
        for key in dict.fromkeys([longest, busiest]):
            mark = server.mark()
            result = in_child(read_lane, stream(key[0]), key[1], args.workers)
            logged = [line for line in server.lines_since(mark) if line.startswith("GET ")]
            result["logged"] = len(logged)
            result["logged_bytes"] = sum(int(line.split()[-1]) for line in logged)
            reads[key] = result

        # The report.
        index_file = (work / "served" / PREFIX / INDEX_FILE).stat().st_size
        manifest_file = (work / "served" / PREFIX / MANIFEST).stat().st_size
        lane_requests = [v["requests"] for v in lanes.values()]
        lane_mb = [round(v["bytes"] / 1e6, 1) for v in lanes.values()]
        real = " and ".join(f"{n} ({m:.0f} MB)" for n, m in zip(counts, real_mb))
        print(f"simulated ImageNet: {TRAIN_SAMPLES:,} training samples in {len(data.train):,} shards + {VAL_SAMPLES:,} "
              f"validation in {len(data.val)} shards, {data.num_classes} classes; every shard a link to one of 2 real "
              f"shards of {real} ImageNet JPEGs from {args.src}, served over HTTP from 127.0.0.1 ({server.url}); "
              f"set up in {prepared_s:.0f} s")
        print(f"{args.ranks} ranks x {args.workers} loader workers, batch {args.batch_size} per rank, shuffle buffer "
              f"{args.shuffle_buffer}, epoch {args.epoch}; reads of up to {chunk >> 20} MB, prefetch "
              f"{remote_module.PREFETCH}, {remote_module.MAX_IN_FLIGHT} in flight per process, "
              f"{stream(0).interleave_shards} shards read at once per lane")
        print()
        print(f"index.npz: {index_file / 1e6:.2f} MB on the server ({index_file / (TRAIN_SAMPLES + VAL_SAMPLES):.1f} "
              f"B/sample), {index.nbytes / 1e6:.1f} MB of arrays in memory "
              f"({index.nbytes / (TRAIN_SAMPLES + VAL_SAMPLES):.1f} B/sample: "
              + ", ".join(f"{k} {a.dtype}" for k, a in index.arrays.items())
              + f"); manifest.json {manifest_file / 1e6:.2f} MB")
        walls = [o["wall"] for o in openings]
        logged = openings[0]["logged"]
        print(f"start-up per process (open_prepared, {len(openings)} fresh processes one after another): "
              f"{statistics.median(walls):.2f} s median (min {min(walls):.2f}, max {max(walls):.2f}), "
              f"{spread(o['requests'] for o in openings)} requests (min/median/max), "
              f"{statistics.median(o['bytes'] for o in openings) / 1e6:.2f} MB, memory +"
              f"{statistics.median(o['rss'] for o in openings) / 1e6:.0f} MB RSS median; server log: "
              + "; ".join(logged))
        print()
        print(f"per epoch: {bpe} batches on every one of the {args.ranks} ranks (asserted), "
              f"{bpe * args.batch_size:,} samples each, {used:,} of {TRAIN_SAMPLES:,} used (the last "
              f"{TRAIN_SAMPLES - used:,} dropped), lanes tile them without overlap (asserted); lane batches "
              f"{spread(v['batches'] for v in lanes.values())}, samples "
              f"{spread(v['samples'] for v in lanes.values())}, shard segments "
              f"{spread(v['segments'] for v in lanes.values())} (min/median/max)")
        histogram = collections.Counter(lane_requests)
        print(f"requests per lane (loader worker) per epoch: {spread(lane_requests)} (min/median/max; "
              + ", ".join(f"{n} requests: {c} lanes" for n, c in sorted(histogram.items()))
              + f"), MB per lane {spread(lane_mb)}, {total_bytes / total_requests / 1e6:.1f} MB per request on average")
        print(f"requests per rank per epoch ({args.workers} lanes): {spread(r for r, _ in per_rank)}, MB per rank "
              f"{spread(round(b / 1e6) for _, b in per_rank)}; all ranks: {total_requests:,} requests, "
              f"{total_bytes / 1e9:.1f} GB per epoch (+{args.ranks} x {openings[0]['requests']} at start-up)")
        node = 8  # ranks per node
        bursts = [sum(lanes[r, w]["burst"] for r in range(n, min(n + node, args.ranks)) for w in range(args.workers))
                  for n in range(0, args.ranks, node)]
        sample_bytes = total_bytes / sum(v["samples"] for v in lanes.values())
        print(f"requested as an epoch starts (a lane's first {interleave} segments open at once, each with PREFETCH "
              f"+ 1 = {remote_module.PREFETCH + 1} reads submitted by its first sample): MB per lane "
              f"{spread(round(v['burst'] / 1e6) for v in lanes.values())}, GB per node of {node} ranks "
              f"{spread(round(b / 1e9, 1) for b in bursts)}; the shuffle buffer needs {args.shuffle_buffer} samples "
              f"({args.shuffle_buffer * sample_bytes / 1e6:.0f} MB) per lane before a lane's first sample, "
              f"{node * args.workers * args.shuffle_buffer * sample_bytes / 1e9:.1f} GB per node")
        print()

        def mem_line(name: str, m: dict) -> str:
            grow = {k: (m["after"][k] - m["start"][k]) / 1e6 for k in ("rss", "uss", "pss")}
            start, after = m["start"], m["after"]
            return (f"{name}: RSS {start['rss'] / 1e6:.0f} -> {after['rss'] / 1e6:.0f} MB (+{grow['rss']:.0f}), "
                    f"USS {start['uss'] / 1e6:.0f} -> {after['uss'] / 1e6:.0f} MB (+{grow['uss']:.0f}), "
                    f"PSS +{grow['pss']:.0f} MB; {m['requests']} requests, {m['bytes'] / 1e6:.0f} MB read; index pages "
                    f"resident {m['index_resident'] / 1e6:.1f} of {m['index_bytes'] / 1e6:.1f} MB "
                    f"({m['index_resident'] / m['after']['rss']:.1%} of its RSS, shared with the rank's process: "
                    f"not in USS)")
        print(f"a loader worker's memory after {args.memory_samples} samples of lane {mem_lane} of rank {mem_rank} "
              f"(forked from a process holding the index):")
        print("  " + mem_line(f"shuffle buffer {args.shuffle_buffer}", worker))
        print("  " + mem_line("no shuffle buffer", unbuffered))
        print()
        for (rank, lane), r in reads.items():
            plan = lanes[rank, lane]
            same = r["requests"] == plan["requests"] and r["bytes"] == plan["bytes"] and r["items"] == plan["samples"]
            print(f"lane {lane} of rank {rank} read fully: {r['items']} samples ({r['skipped']} skipped), "
                  f"{r['requests']} requests, {r['bytes'] / 1e6:.1f} MB in {r['wall']:.1f} s; planned "
                  f"{plan['samples']} samples, {plan['requests']} requests, {plan['bytes'] / 1e6:.1f} MB over "
                  f"{plan['segments']} segments; server logged {r['logged']} GETs, {r['logged_bytes'] / 1e6:.1f} MB: "
                  f"{'as planned' if same and r['logged'] == plan['requests'] else 'DIFFERENT'}; most private memory "
                  f"+{r['uss'] / 1e6:.0f} MB (USS); its first sample after {r['first']:.2f} s")
        print(f"total {time.perf_counter() - began:.0f} s")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
