"""Start and end the gloo processes that tests spawn with torch.multiprocessing.spawn.

`leave` ends the process with os._exit once its results are on disk, without Python's finalization. CPython 3.11
ends a native thread that asks for the GIL during finalization with pthread_exit. When that thread is inside a
noexcept C++ frame, for example a c10d/gloo worker thread that releases the tensors of a finished collective, the
forced unwind aborts the process: "terminate called without an active exception" (pytorch/pytorch#38228,
python/cpython#87135; CPython 3.14 makes such threads hang instead). CI saw this twice on rank 1, once after the
barrier below was added. 150 runs here under a loaded CPU did not reproduce it. `start` turns on faulthandler, so an
abort that still happens prints every thread's Python stack.
"""
import faulthandler
import os
import sys

import torch.distributed as dist


def start(rank, world, init_file):
    faulthandler.enable(all_threads=True)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def leave():
    dist.barrier()  # both processes leave together: neither tears gloo down while its peer still talks to it
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
