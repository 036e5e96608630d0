"""The driver's memory during a checkpoint of many per-key states, on the real stack (MLflow, Ray).

Readers here are Ray actors that hold ``--keys`` states of ``--state-mb`` each (the shipped tiny
model's per-key state is 2.4 MB) and write them as a reader does (``actors.state_upload``): the
driver's side of the checkpoint is the one ``ttt-stream run`` runs (``StreamCheckpointer.write``
with ``ReaderPool.write_states``). Side by side, at fewer keys, the way it was before: the driver
gathers every state and writes them itself. The figure is the growth of the driver's resident
memory over the checkpoint (sampled every 2 ms), against the size of one state.

    .venv/bin/python bench/checkpoint_memory.py --readers 8 --keys 64,256,1024 --gather-keys 16,64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray
import yaml

from actors.call_types import StateBlob, StateTarget
from actors.runtime import init_ray
from actors.state_upload import StateUploader
from pipeline.config import AppConfig, CheckpointConfig, parse_config
from pipeline.local.local_stack import LocalStack
from pipeline.state.checkpoint import CheckpointStore, StreamCheckpointer

PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def own_stack(data_dir: Path) -> AppConfig:
    """The embedded default's servers on free ports, their data under ``data_dir``."""
    raw = yaml.safe_load(Path("configs/local.yaml").read_text())
    mlflow_port = free_port()
    raw["mlflow"]["tracking_uri"] = f"http://127.0.0.1:{mlflow_port}"
    raw["local_stack"].update({"data_dir": str(data_dir)})
    raw["local_stack"]["mlflow"]["port"] = mlflow_port
    raw["local_stack"]["broker"]["port"] = free_port()
    return parse_config(raw, environ={})


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """The highest resident memory of this process while the block runs, above where it began."""

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        self.growth = self.peak - self.start


@ray.remote(num_cpus=0)
class SyntheticReader:
    """``keys`` states of ``size`` bytes, made one at a time from their seed (so that the actor,
    like a reader with spilled states, holds one at a time)."""

    def __init__(self, name: str, keys: int, size: int):
        self.name, self.keys, self.size = name, keys, size
        self.uploader = StateUploader(name)

    def _states(self):
        for k in range(self.keys):
            data = np.random.default_rng([k, abs(hash(self.name)) % 2**31]).bytes(self.size)
            yield StateBlob(f"{k:032x}", data, hashlib.sha256(data).hexdigest(), 1, 0, k)

    def write_states(self, target: StateTarget) -> bytes:
        return self.uploader.write(self._states(), target)

    def snapshot(self) -> list[StateBlob]:
        return list(self._states())


def checkpoint(checkpointer: StreamCheckpointer, readers, names, gather: bool) -> tuple[str | None, float]:
    """One checkpoint, the readers writing their own states (or, ``gather``, the driver all of them)."""
    started = time.monotonic()
    if gather:
        states = dict(zip(names, ray.get([r.snapshot.remote() for r in readers])))
    else:
        def states(run):
            return dict(zip(names, ray.get([r.write_states.remote(run) for r in readers])))
    version = checkpointer.write(states, {0: 0}, "periodic", {})
    return version, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--keys", default="64,256,1024", help="per reader, each a run of the readers' own writes")
    parser.add_argument("--gather-keys", default="16,64", help="per reader, each a run of the driver gathering")
    parser.add_argument("--state-mb", type=float, default=2.4)
    parser.add_argument("--out", type=Path, default=Path("bench/results/checkpoint_memory.json"))
    args = parser.parse_args()
    size = int(args.state_mb * 1e6)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ttt-bench-ckpt-") as tmp:
        config = own_stack(Path(tmp) / "stack")
        stack = LocalStack(config.local_stack)
        stack.up(skip=("broker",))  # MLflow only: a checkpoint touches no topic
        try:
            init_ray(address=None, num_cpus=2, object_store_memory_mb=512, namespace="ttt-bench")
            cases = [("readers write", int(k), False) for k in args.keys.split(",")] + \
                    [("driver gathers", int(k), True) for k in args.gather_keys.split(",")]
            for i, (how, keys, gather) in enumerate(cases):
                names = [f"r{i}-{w}" for w in range(args.readers)]
                readers = [SyntheticReader.remote(n, keys, size) for n in names]
                store = CheckpointStore(config.mlflow, f"bench-ckpt-{i}")
                checkpointer = StreamCheckpointer(store, CheckpointConfig(keep_versions=None), "docs", "digest",
                                                  {"path": "synthetic", "weights_sha256": "-"}, None, {0: 0})
                # A first checkpoint, of one key a reader, warms the imports and caches (MLflow,
                # pandas for the pyfunc's example, the store's tombstones).
                warm = [SyntheticReader.remote(n, 1, size) for n in names]
                assert checkpoint(checkpointer, warm, names, gather)[0] is not None
                for r in warm:
                    ray.kill(r)
                with PeakRSS() as memory:
                    version, seconds = checkpoint(checkpointer, readers, names, gather)
                assert version is not None, "the checkpoint failed"
                loaded = len(store._manifest(version)["readers"][names[0]])
                assert loaded == keys, (loaded, keys)
                row = {"how": how, "readers": args.readers, "keys_per_reader": keys, "states": args.readers * keys,
                       "state_bytes": size, "checkpoint_s": round(seconds, 2),
                       "driver_rss_growth_bytes": memory.growth,
                       "driver_rss_growth_in_states": round(memory.growth / size, 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                for r in readers:
                    ray.kill(r)
        finally:
            ray.shutdown()
            stack.down()
    result = {"benchmark": "checkpoint_memory", "command": "bench/checkpoint_memory.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "time": time.time(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
