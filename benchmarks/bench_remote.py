"""Training-loader throughput from an object store: this project's TrainStream reading the same
shards from local disk, from S3 (moto on 127.0.0.1), from S3 through the node cache, and
webdataset's own reading of them from the same server, in one run.

    python benchmarks/bench_remote.py --src /tmp/imagenet-samples-100 [--replicate 20] [--shard-size 500]
                                      [--size 224] [--batch-size 64] [--workers 2] [--repeats 2]
                                      [--shuffle-buffer 100] [--config-buffer 1000] [--epoch-gap 1]
                                      [--chunk-mb MB] [--prefetch N]

(``tar -xf ../shared/data/imagenet-samples-100.tar -C /tmp`` gives that folder: 100 real ImageNet
JPEGs named ``<wnid>_<class>.JPEG``, staged here as 100 classes, each file ``--replicate`` times.)

The images are prepared once (``data_prep`` writer, ``--shard-size`` samples per shard: 500
ImageNet JPEGs make ~53 MB shards) and uploaded to a moto S3 server that this script starts on
127.0.0.1 and stops at the end. moto checks no signatures, but it does answer an unauthenticated
GET with 403 unless a bucket policy allows it: the bucket gets one allowing ``s3:GetObject`` to
everyone, for webdataset's curl. Contestants, all with random-resized 224 px crops (area 8-100%,
aspect 3/4-4/3) and flips into uint8 batches of ``--batch-size`` in a DataLoader with
``--workers`` forked worker processes:

- (a) TrainStream on the shards on local disk;
- (b) TrainStream on ``s3://bench/ds`` (``AWS_ENDPOINT_URL`` = the moto server);
- (c) (b) with ``RemoteOptions(cache_dir=...)``: (c1) epoch 1 fills the cache, (c2) epoch 2 reads it;
- (d) webdataset 1.0.2 reading the same objects with ``pipe:curl -s -f http://127.0.0.1:PORT/bench/ds/NAME``:
  ``WebDataset(urls, shardshuffle=100, workersplitter=split_by_worker).shuffle(B).decode("pil")
  .to_tuple("jpg", "cls").map_tuple(RandomResizedCrop + RandomHorizontalFlip + PILToTensor, int)
  .batched(batch)``;
- (e) (d)'s pipeline on the local shard files (how much of (d) is decoding rather than reading);
- (a2), (b2): (a) and (b) as the trainer reads, with persistent workers: their second epoch is
  timed, after ``--epoch-gap`` seconds (where the trainer validates; a persistent worker opens
  its next epoch's shard segments as it ends one, so their first reads are done by then).

Every contestant is timed over whole epochs: images/s after the first batch (the steady rate, as
``bench_loader``'s ``timed``) and over the whole epoch, and the seconds to the first batch (worker
start-up and the reads that fill the shuffle buffers), best of ``--repeats`` epochs. The shuffle
buffer is ``--shuffle-buffer`` samples for every contestant (TrainStream's ``shuffle_buffer``,
webdataset's ``.shuffle``): the lanes here are only ~1,000 samples, and TrainStream's buffer yields
nothing until it is full, so with the configs' 1,000 a lane would read all its samples before
its first batch and the steady rate would time decoding alone. The time to the first batch with
``--config-buffer`` (the ImageNet configs' 1,000) is measured separately.

Request and byte counts of (b) and (c) are the sums of what each loader worker's ``Store.stats``
counted during its epoch (each worker reports its own when its lane ends), checked against the
GET lines of moto's access log. CPU: the loader workers' CPU time per epoch (their threads and
curl included), and the moto server's. ``--chunk-mb`` and ``--prefetch`` override
``RemoteShards.chunk_bytes`` and ``shards.remote.PREFETCH`` (to investigate; by default the
project's values).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shards.remote as remote_module  # noqa: E402
from data_prep.plan import PrepParams  # noqa: E402
from data_prep.writer import run as prepare  # noqa: E402
from imaging import jpeg_region  # noqa: E402
from imaging.specs import CropSpec  # noqa: E402
from pipeline.data.batches import make_loader  # noqa: E402
from pipeline.data.prepared import RemoteOptions, open_prepared  # noqa: E402
from pipeline.data.webdataset_input import TrainStream  # noqa: E402

BUCKET, PREFIX = "bench", "ds"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy


def stage(src: Path, replicate: int, dest: Path) -> int:
    """Class folders of hard links: ``<wnid>_name.JPEG`` files at the top of ``src`` go to class
    ``<wnid>`` (files already in class folders keep theirs), each ``replicate`` times."""
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"{src}: no images")
    for path in files:
        relative = path.relative_to(src)
        cls = relative.parts[0] if len(relative.parts) > 1 else path.stem.split("_")[0]
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for k in range(replicate):
            os.link(path, dest / cls / f"{path.stem}_r{k}{path.suffix}")
    return len(files) * replicate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """moto's S3 as a server on 127.0.0.1 in a subprocess; its access log lists the requests."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "moto.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 60
        while True:
            try:
                with _DIRECT.open(self.endpoint + "/moto-api/", timeout=5) as r:
                    r.read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"moto server did not start:\n{self.log.read_text()[-2000:]}") from None
                time.sleep(0.1)

    def cpu_s(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def log_size(self) -> int:
        return self.log.stat().st_size

    def gets_since(self, offset: int) -> list[str]:
        """``PATH STATUS`` of every GET logged after ``offset`` (werkzeug's access log)."""
        time.sleep(0.2)  # a request's line is written after its last byte
        with open(self.log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return [f"{path} {status}" for path, status in re.findall(r'"GET (\S+) HTTP/[\d.]+" (\d+)', text)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def upload(folder: Path, endpoint: str) -> int:
    """Every file of the prepared folder to s3://BUCKET/PREFIX/, readable by unauthenticated GETs; bytes."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
                                                      "Resource": f"arn:aws:s3:::{BUCKET}/*"}]}
    client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps(policy))
    total = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), BUCKET, f"{PREFIX}/{path.relative_to(folder).as_posix()}")
        total += path.stat().st_size
    return total


class Counted(IterableDataset):
    """The dataset, with each loader worker writing to ``folder/<pid>.json``, when its lane is done,
    the CPU time it used (its threads and its finished children, i.e. curl, included) and, for a
    remote dataset, what its store did (requests, bytes, retries)."""

    def __init__(self, dataset: IterableDataset, remote, folder: Path):
        self.dataset, self.remote, self.folder = dataset, remote, folder

    def __iter__(self):
        stats = self.remote.store.stats if self.remote is not None else None
        before = (stats.requests, stats.bytes, stats.retries) if stats else (0, 0, 0)  # the parent's, forked
        yield from self.dataset
        times = psutil.Process().cpu_times()
        counts = {"cpu": times.user + times.system + times.children_user + times.children_system}
        if stats is not None:
            after = (stats.requests, stats.bytes, stats.retries)
            counts.update(zip(("requests", "bytes", "retries"), (b - a for a, b in zip(before, after))))
        (self.folder / f"{os.getpid()}.json").write_text(json.dumps(counts))


def worker_counts(folder: Path, workers: int) -> dict:
    """The sums of the loader workers' reports."""
    reports = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    if len(reports) != workers:
        raise RuntimeError(f"{len(reports)} of {workers} loader workers reported their counts")
    return {k: sum(r[k] for r in reports) for k in reports[0]}


def timed_epoch(loader) -> tuple[float, float, int, float]:
    """(images/s after the first batch, images/s over the whole epoch, images, seconds to the first
    batch: worker start-up, and the reads that fill the shuffle buffers)."""
    start = time.perf_counter()
    iterator = iter(loader)
    head = len(next(iterator)[0])
    first = time.perf_counter() - start
    images = 0
    for batch in iterator:
        images += len(batch[0])
    wall = time.perf_counter() - start
    return images / (wall - first), (head + images) / wall, head + images, first


def first_batch(loader) -> float:
    """Seconds to the loader's first batch; then its workers are shut down."""
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    elapsed = time.perf_counter() - start
    del iterator
    return elapsed


def wds_loader(urls: list[str], size: int, batch_size: int, workers: int, buffer: int, folder: Path) -> DataLoader:
    crop = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),  # uint8 [3, H, W], as this project's batches
    ])
    dataset = (wds.WebDataset(urls, shardshuffle=100, nodesplitter=wds.single_node_only,
                              workersplitter=wds.split_by_worker, empty_check=False)
               .shuffle(buffer).decode("pil").to_tuple("jpg", "cls").map_tuple(crop, int).batched(batch_size))
    return DataLoader(Counted(dataset, None, folder), batch_size=None, num_workers=workers,
                      prefetch_factor=4 if workers else None, multiprocessing_context="fork" if workers else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--replicate", type=int, default=20)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epoch-gap", type=float, default=1.0,
                        help="seconds between the persistent contestants' two epochs, where the trainer validates "
                        "(default 1)")
    parser.add_argument("--shuffle-buffer", type=int, default=100,
                        help="samples, for every contestant (TrainStream's shuffle_buffer, webdataset's .shuffle)")
    parser.add_argument("--config-buffer", type=int, default=1000,
                        help="the ImageNet configs' shuffle buffer: the time to the first batch with it is measured "
                        "separately (0: not)")
    parser.add_argument("--chunk-mb", type=float, help="override RemoteShards.chunk_bytes (default: the project's)")
    parser.add_argument("--prefetch", type=int, help="override shards.remote.PREFETCH (default: the project's)")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed for webdataset's pipe:curl URLs")
    if args.prefetch is not None:
        remote_module.PREFETCH = args.prefetch  # read by the forked workers at each shard they open
    work = Path(tempfile.mkdtemp(prefix="bench_remote_"))
    moto = None
    try:
        count = stage(args.src, args.replicate, work / "images")
        stage(args.src, 1, work / "val")  # a small validation split: only the training loader is timed
        params = PrepParams(train=str(work / "images"), val=str(work / "val"), shard_size=args.shard_size)
        prepare(params, work / "shards", workers=args.workers)
        local = open_prepared(work / "shards")

        moto = Moto(work)
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto.endpoint,
                           "AWS_EC2_METADATA_DISABLED": "true"})
        uploaded = upload(work / "shards", moto.endpoint)
        names = [s.name for s in local.train]
        http = [f"{moto.endpoint}/{BUCKET}/{PREFIX}/{name}" for name in names]
        check = subprocess.run(["curl", "-s", "-f", "-r", "0-511", "-o", "/dev/null", "-w", "%{http_code}", http[0]],
                               capture_output=True, text=True)
        if check.stdout != "206":
            raise SystemExit(f"an unauthenticated ranged GET of {http[0]} answered {check.stdout or check.returncode}")

        location = f"s3://{BUCKET}/{PREFIX}"
        openings = []
        for _ in range(3):
            mark = moto.log_size()
            start = time.perf_counter()
            opened = open_prepared(location, RemoteOptions())
            wall = time.perf_counter() - start
            stats = opened.remote.store.stats
            openings.append((wall, stats.requests, stats.bytes, len(moto.gets_since(mark))))

        def remote(options: RemoteOptions):
            prepared = open_prepared(location, options)
            if args.chunk_mb:
                prepared.remote.chunk_bytes = int(args.chunk_mb * (1 << 20))
            return prepared

        data = remote(RemoteOptions())
        batches = count // args.batch_size

        def stream(prepared, buffer: int = args.shuffle_buffer) -> TrainStream:
            return TrainStream(prepared.train, batch_size=args.batch_size, batches_per_epoch=batches, rank=0,
                               world_size=1, seed=0, image_size=args.size, crop=CropSpec(), baked=False,
                               shuffle_buffer=buffer, eval_resize=round(args.size * 256 / 224),
                               num_classes=prepared.num_classes)

        results: dict[str, list[dict]] = {}
        firsts: dict[str, list[float]] = {}
        (work / "counts").mkdir()

        def folder() -> Path:
            path = work / "counts" / str(len(list((work / "counts").iterdir())))
            path.mkdir()
            return path

        def run(name: str, make) -> None:
            """One epoch of one contestant: its rates, and what its workers and the server did."""
            reports = folder()
            loader = make(reports)
            mark, cpu = moto.log_size(), moto.cpu_s()
            rate, whole, images, first = timed_epoch(loader)
            server_cpu = moto.cpu_s() - cpu
            gets = [g for g in moto.gets_since(mark) if f"/{BUCKET}/{PREFIX}/" in g]
            results.setdefault(name, []).append({
                "rate": rate, "whole": whole, "images": images, "first": first, "server_cpu": server_cpu,
                "gets": len(gets), "statuses": sorted({g.rsplit(" ", 1)[1] for g in gets}),
                **worker_counts(reports, args.workers)})

        def project(s: TrainStream, prepared, epoch: int):
            def make(reports: Path):
                s.set_epoch(epoch)
                return make_loader(Counted(s, prepared.remote, reports), args.workers, pin_memory=False)
            return make

        def persistent(s: TrainStream, prepared, epoch: int):
            """As the trainer reads: workers that persist over epochs; the second epoch is timed."""
            def make(reports: Path):
                s.set_epoch(epoch)
                s.open_ahead_until = epoch + 1  # as the trainer sets it
                loader = make_loader(Counted(s, prepared.remote, reports), args.workers, pin_memory=False,
                                     persistent=True)
                for _ in loader:  # the first epoch: workers start and connect
                    pass
                for report in reports.glob("*.json"):
                    report.unlink()
                s.set_epoch(epoch + 1)
                s.open_ahead_until = None  # (the workers have their own copy; other contestants share this one)
                time.sleep(args.epoch_gap)  # the trainer validates here: the next epoch's first reads land
                return loader
            return make

        def webdataset(urls: list[str], buffer: int = args.shuffle_buffer):
            return lambda reports: wds_loader(urls, args.size, args.batch_size, args.workers, buffer, reports)

        curl_urls = [f"pipe:curl -s -f {u}" for u in http]
        local_stream, remote_stream = stream(local), stream(data)
        for repeat in range(args.repeats):
            run("(a) TrainStream, local disk", project(local_stream, local, repeat))
            run("(b) TrainStream, S3 (moto)", project(remote_stream, data, repeat))
            run("(a2) (a), persistent workers, epoch 2", persistent(local_stream, local, 2 * repeat))
            run("(b2) (b), persistent workers, epoch 2", persistent(remote_stream, data, 2 * repeat))
            cached = remote(RemoteOptions(cache_dir=str(work / f"cache{repeat}")))
            cached_stream = stream(cached)
            run("(c1) S3 + cache, epoch 1 (fills)", project(cached_stream, cached, repeat))
            run("(c2) S3 + cache, epoch 2 (cached)", project(cached_stream, cached, repeat + 1))
            run("(d) webdataset, pipe:curl (moto)", webdataset(curl_urls))
            run("(e) webdataset, local files", webdataset([str(work / "shards" / n) for n in names]))
            if args.config_buffer:
                for name, prepared in (("(a)", local), ("(b)", data)):
                    s = stream(prepared, args.config_buffer)
                    s.set_epoch(repeat)
                    firsts.setdefault(name, []).append(first_batch(make_loader(s, args.workers, pin_memory=False)))
                firsts.setdefault("(d)", []).append(first_batch(webdataset(curl_urls, args.config_buffer)(folder())))

        shard_mb = statistics.mean(s.bytes for s in local.train) / 1e6
        print(f"{count} images from {args.src} (x{args.replicate}, {local.num_classes} classes) in {len(local.train)} "
              f"training shards of {args.shard_size} (~{shard_mb:.0f} MB; {uploaded / 1e6:.0f} MB uploaded to moto "
              f"{moto.endpoint}); {args.size}px crops, batch {args.batch_size}, {args.workers} workers, "
              f"{os.cpu_count()} CPUs, shuffle buffer {args.shuffle_buffer}; reads of up to "
              f"{data.remote.chunk_bytes / (1 << 20):g} MB, prefetch {remote_module.PREFETCH}, "
              f"{remote_module.MAX_IN_FLIGHT} in flight; JPEG region decoder "
              f"{'built' if jpeg_region.available() else 'not built (Pillow)'}; best of {args.repeats} epochs")
        walls = sorted(o[0] for o in openings)
        print(f"start-up, open_prepared({location}): {statistics.median(walls) * 1e3:.0f} ms median of "
              f"{len(walls)} ({', '.join(f'{w * 1e3:.0f}' for w in walls)} ms), {openings[0][1]} requests "
              f"({openings[0][3]} GETs in moto's log), {openings[0][2] / 1e3:.1f} kB "
              f"(manifest {(work / 'shards' / 'manifest.json').stat().st_size / 1e3:.1f} kB + index.npz "
              f"{(work / 'shards' / 'index.npz').stat().st_size / 1e3:.1f} kB)")
        print("img/s: after the first batch | over the whole epoch; first: seconds to the first batch; CPU: the "
              "loader workers' (with curl) | moto's, per epoch; requests, MB: the workers' Store.stats, per epoch")
        print(f"{'':34s} {'img/s':>6s} {'epoch':>6s} {'first':>6s} {'CPU':>6s} {'moto':>5s} {'requests':>9s} "
              f"{'MB read':>13s} {'moto GETs':>9s}")
        best = {name: {"rate": max(r["rate"] for r in rows), "whole": max(r["whole"] for r in rows)}
                for name, rows in results.items()}
        for name, rows in results.items():
            first = min(r["first"] for r in rows)
            cpu, server = statistics.median(r["cpu"] for r in rows), statistics.median(r["server_cpu"] for r in rows)
            requests = "/".join(str(r["requests"]) for r in rows) if "requests" in rows[0] else "-"
            megabytes = "/".join(f"{r['bytes'] / 1e6:.1f}" for r in rows) if "bytes" in rows[0] else "-"
            gets = "/".join(str(r["gets"]) for r in rows) if rows[0]["gets"] else "-"
            print(f"{name:34s} {best[name]['rate']:6.0f} {best[name]['whole']:6.0f} {first:5.2f}s {cpu:5.1f}s "
                  f"{server:4.1f}s {requests:>9s} {megabytes:>13s} {gets:>9s}"
                  + (f"  (HTTP {','.join(rows[0]['statuses'])})" if rows[0]["statuses"] else "")
                  + (f"  {sum(r['retries'] for r in rows)} retries" if any(r.get("retries") for r in rows) else ""))

        def ratio(x: str, y: str, key: str) -> float:
            return best[x][key] / best[y][key]

        a, b = "(a) TrainStream, local disk", "(b) TrainStream, S3 (moto)"
        c1, c2 = "(c1) S3 + cache, epoch 1 (fills)", "(c2) S3 + cache, epoch 2 (cached)"
        d, e = "(d) webdataset, pipe:curl (moto)", "(e) webdataset, local files"
        for key, what in (("rate", "after the first batch"), ("whole", "whole epoch")):
            print(f"{what:21s}: (b)/(a) {ratio(b, a, key):.2f}x (target >= 0.9)   (b)/(d) {ratio(b, d, key):.2f}x "
                  f"(target >= 1.5)   (c1)/(a) {ratio(c1, a, key):.2f}x   (c2)/(a) {ratio(c2, a, key):.2f}x   "
                  f"(a)/(e) {ratio(a, e, key):.2f}x   (d)/(e) {ratio(d, e, key):.2f}x")
        a2, b2 = "(a2) (a), persistent workers, epoch 2", "(b2) (b), persistent workers, epoch 2"
        print(f"as the trainer reads (persistent workers), whole epoch: (b2)/(a2) {ratio(b2, a2, 'whole'):.2f}x "
              f"(target >= 0.9)   (b2)/(d) {ratio(b2, d, 'whole'):.2f}x (target >= 1.5)")
        if firsts:
            print(f"first batch with a shuffle buffer of {args.config_buffer} (the ImageNet configs'; TrainStream's "
                  f"yields when full, webdataset's .shuffle({args.config_buffer}) at 100): "
                  + ", ".join(f"{name} {min(t):.2f} s" for name, t in firsts.items())
                  + f" (lanes of ~{count // args.workers} samples here)")
        rows = results[b]
        megabytes = "/".join(f"{r['bytes'] / 1e6:.1f}" for r in rows)
        print(f"(b) per epoch: {'/'.join(str(r['requests']) for r in rows)} requests, {megabytes} MB for "
              f"{rows[0]['images']} images ({rows[0]['bytes'] / sum(s.bytes for s in local.train):.3f} of the "
              f"training shards' bytes), moto logged {'/'.join(str(r['gets']) for r in rows)} GETs")
    finally:
        if moto is not None:
            moto.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
