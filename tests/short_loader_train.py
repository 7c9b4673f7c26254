"""``accelerate launch tests/short_loader_train.py [key=value ...]``: train.py, with the real
loader of process 1 cut short after 2 batches of each epoch, as a loader whose data holds less
than its manifest says (the shard loader itself turns such gaps into bad samples, so a short
loader cannot be made from shards alone)."""
from __future__ import annotations

import itertools

from pipeline.train import cli, run

real_make_input = run.make_input


def make_short_input(config, data, accelerator, layout, photometric):
    made = real_make_input(config, data, accelerator, layout, photometric)
    if accelerator.process_index == 1:
        full = made.train_batches
        made.train_batches = lambda epoch, start: itertools.islice(full(epoch, start), 2)
    return made


run.make_input = make_short_input

if __name__ == "__main__":
    cli.main()
