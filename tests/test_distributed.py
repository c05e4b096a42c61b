"""Data-parallel runs under torchrun, on the CPU with gloo over loopback: the same results as one process, one
run directory, the same feature cache either way, an interrupted run resumed, and two "machines" that meet by
c10d rendezvous.

Every torchrun start costs several seconds (each process imports torch and timm), so three starts serve every
assertion here through module-scoped fixtures: `compare` with two processes; `train` with two, stopped by
SIGTERM to one of them; and its `--resume` as two machines of one process each. The collectives themselves
(gathers over uneven shares, a lost process within a timeout) are checked between two bare processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import transferlab as tl
from transferlab import cli, distributed
from transferlab.runs import checkpoint_path

from .conftest import TINY, make_folder
from .test_reliability import error_line, flags

# One process at batch 8, or two at batch 4 each: the same global batch and, without dropout (whose masks differ
# by process), the same computation up to rounding; 18 training images, so no process pads its share.
ONE = TINY | {"val_split": 0.25, "batch_size": 8, "dropout": 0.0}
TWO = ONE | {"batch_size": 4}
FULL = {"strategy": "full", "cache": False, "epochs": 6, "patience": 0}  # images decoded each epoch: slow epochs


def torchrun(*argv: str, launch: tuple[str, ...] = ("--standalone", "--nproc-per-node", "2"), cwd: Path,
             wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    """`torchrun LAUNCH -m transferlab ARGV` in `cwd` (with its own default feature cache), output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "transferlab", *argv]
    env = os.environ | {"TRANSFERLAB_CACHE": str(cwd / "default-cache"), "OMP_NUM_THREADS": "1"}  # 2 cores, 2 processes
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(command, cwd=cwd, env=env, text=True, capture_output=True, timeout=300)


def said(stderr: str) -> list[str]:
    """transferlab's own lines among torchrun's (its warnings, its report of a process that failed)."""
    return [line for line in stderr.splitlines() if line.startswith("transferlab:")]


def clean(done: subprocess.CompletedProcess) -> bool:
    """No transferlab process printed a traceback (torchrun prints its own when a process fails)."""
    return not any("transferlab/" in line and line.lstrip().startswith("File ") for line in done.stderr.splitlines())


def run_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def within_one_image(a: float, b: float, images: int) -> bool:
    return abs(a - b) * images <= 1 + 1e-9


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    make_folder(root / "data")
    make_folder(root / "test", per_class=4, seed=1)
    min((root / "test" / "dogs").iterdir()).unlink()  # 7 test images: shares of 4 and 3
    return root


# ---------------------------------------------------------------- compare, and the feature cache


@pytest.fixture(scope="module")
def compared(root) -> tuple[subprocess.CompletedProcess, tl.Comparison]:
    """compare feature-extraction and partial with two processes, on a cache where one process left the
    feature-extraction features (block 9); and with one process, on a cache of its own."""
    tl.train(root / "data", strategy="feature-extraction", cache_dir=str(root / "cache-shared"), **ONE)
    strategies = ["feature-extraction", "partial"]
    two = torchrun("compare", "--data", str(root / "data"), "--test", str(root / "test"), "--strategies",
                   ",".join(strategies), "--out", str(root / "compare-two"), "--cache-dir", str(root / "cache-shared"),
                   *flags(TWO), cwd=root)
    one = tl.compare(root / "data", strategies, root / "compare-one", test=root / "test",
                     cache_dir=str(root / "cache-one"), **ONE)
    return two, one


def test_compare_with_two_processes_writes_one_comparison_as_one_process_does(compared, root):
    two, one = compared
    assert two.returncode == 0 and clean(two), two.stderr
    assert two.stdout.count("report: ") == 1  # only the main process prints
    out = root / "compare-two"
    assert run_dirs(out) == ["feature-extraction", "partial"]
    assert sorted(os.listdir(out)) == ["comparison.csv", "comparison.json", "feature-extraction", "partial", "plots",
                                       "predictions", "report.html", "report.md"]
    rows = {r["name"]: r for r in json.loads((out / "comparison.json").read_text())["points"]}
    for mine in one.rows:
        row = rows[mine.name]
        assert row["epochs_run"] == mine.epochs_run and tl.load(out / mine.name).info["device"]["processes"] == 2
        for split, images, scores in (("val", one.splits.val, mine.val), ("test", one.splits.test, mine.test)):
            assert within_one_image(row[split]["accuracy"], scores.accuracy, len(images)), row
        assert np.sum(row["val"]["confusion"]) == len(one.splits.val)  # every image once
        right = row["test"]["accuracy"] * len(one.splits.test)  # a count of 7 images: none dropped or repeated
        assert len(one.splits.test) == 7 and abs(right - round(right)) < 1e-9, row


def test_the_sharded_cache_is_the_single_process_cache_and_either_reuses_the_other(compared, root):
    two, _ = compared
    rows = {r["name"]: r for r in json.loads((root / "compare-two" / "comparison.json").read_text())["points"]}
    assert rows["feature-extraction"]["features_computed"] == 1  # read one process's block 9; only test's is new
    assert rows["partial"]["features_computed"] == 3  # and shared out block 8: train, validation and test
    shared, one = ({p.name: np.load(p) for p in (root / name).glob("*.npy")} for name in ("cache-shared", "cache-one"))
    assert shared.keys() == one.keys() and len(one) == 6  # blocks 8 and 9 of the three splits; no parts left
    for name in one:  # equal up to float16 rounding: oneDNN rounds by thread count and batch size
        assert np.allclose(shared[name], one[name], rtol=2e-3, atol=1e-3), name
    again = tl.train(root / "data", strategy="partial", cache_dir=str(root / "cache-shared"), **ONE)
    assert again.info["cache"]["misses"] == 0  # one process reads the block 8 that two processes wrote


# ---------------------------------------------------------------- train: SIGTERM, resume, two machines


@pytest.fixture(scope="module")
def stopped(root) -> tuple[Path, subprocess.CompletedProcess]:
    """Full fine-tuning with two processes, stopped by SIGTERM to the second after the first checkpoint."""
    run_dir = root / "train" / "run"
    process = torchrun("train", "--data", str(root / "data"), "--out", str(run_dir), *flags(TWO | FULL), cwd=root,
                       wait=False)
    deadline = time.monotonic() + 240
    while not checkpoint_path(run_dir).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(_rank_pid(process.pid, 1), signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    return run_dir, subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _rank_pid(torchrun_pid: int, rank: int) -> int:
    """The process that torchrun started for `rank` (Linux: its children, told apart by their environment)."""
    children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    return next(int(c) for c in children
                if f"RANK={rank}".encode() in Path(f"/proc/{c}/environ").read_bytes().split(b"\0"))


@pytest.fixture(scope="module")
def resumed(stopped, root) -> list[subprocess.CompletedProcess]:
    """The stopped run resumed by two torchrun invocations of one process each, as on two machines: --nnodes 2
    and c10d rendezvous on a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = ("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
              f"127.0.0.1:{port}", "--rdzv-id", "two-machines")
    machines = [torchrun("train", "--resume", str(stopped[0]), launch=launch, cwd=root, wait=False) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in machines]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(machines, outputs)]


def test_sigterm_to_one_process_stops_both_with_a_checkpoint_that_only_two_processes_resume(stopped, capsys):
    run_dir, done = stopped
    assert done.returncode != 0 and clean(done), done.stderr
    [line] = said(done.stderr)  # the main process says it, once
    assert line.endswith(f"continue with `transferlab train --resume {run_dir}`"), line
    assert not run_dir.exists() and os.listdir(run_dir.parent) == [checkpoint_path(run_dir).name]
    assert cli.main(["train", "--resume", str(run_dir)]) == 2  # one process cannot continue what two began
    assert "resume it under torchrun with 2 processes in all" in error_line(capsys)


def test_two_machines_resume_it_to_one_run_as_one_process_trains(resumed, stopped, root):
    run_dir, _ = stopped
    for machine in resumed:
        assert machine.returncode == 0 and clean(machine), machine.stderr
    assert sum("-> " in m.stdout for m in resumed) == 1  # only the main process prints the result
    assert os.listdir(run_dir.parent) == ["run"]  # the run directory, and no checkpoint or staging beside it
    two = tl.load(run_dir)
    assert [row["epoch"] for row in two.history] == list(range(1, FULL["epochs"] + 1))
    assert two.info["device"]["processes"] == 2
    one = tl.train(root / "data", **ONE | FULL)
    assert within_one_image(two.metrics["accuracy"], one.metrics["accuracy"], two.metrics["n_images"])


# ---------------------------------------------------------------- shares and splits, without processes


def test_shares_cover_every_image_once_and_splits_keep_the_global_batch(monkeypatch):
    for world in (2, 3):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        shares = distributed.shares(10, seed=4)
        assert sorted(sum(shares, [])) == list(range(10)) and max(map(len, shares)) - min(map(len, shares)) <= 1
        assert all(s == sorted(s) for s in shares) and shares == distributed.shares(10, seed=4)
        order = [int(i) for i in np.random.default_rng(0).permutation(11)]
        parts = []
        for rank in range(world):
            monkeypatch.setenv("RANK", str(rank))
            parts.append(distributed.split(order))
        assert len({len(p) for p in parts}) == 1  # as many steps in every process
        for k in range(0, len(parts[0]), 2):  # global batch k, 2 images a process: one process's batch k
            assert sorted(i for p in parts for i in p[k:k + 2]) == sorted((order + order)[k * world:(k + 2) * world])


# ---------------------------------------------------------------- collectives between two bare processes

COLLECTIVES = """
import os, sys, time
from datetime import timedelta
import torch
from transferlab import distributed

distributed.TIMEOUT = timedelta(seconds=3)
distributed.start(torch.device("cpu"))
rows = distributed.share(5, seed=3)  # 3 images here, 2 there
gathered = distributed.gather(torch.tensor(rows, dtype=torch.float64)[:, None] * 10, 5, seed=3)
print("gathered", gathered[:, 0].tolist(), "summed", distributed.all_sum(distributed.rank() + 1, len(rows)), flush=True)
if distributed.rank() == 1:
    if sys.argv[1] == "dies":
        os._exit(1)
    time.sleep(60)  # hangs
began = time.monotonic()
try:
    distributed.barrier()
except distributed.ProcessLost as e:
    print(f"after {time.monotonic() - began:.0f}s: {e}", flush=True)
    os._exit(2)
"""


def test_gathers_are_in_image_order_over_uneven_shares_and_a_lost_process_ends_the_wait():
    def launch(how: str) -> list[subprocess.Popen]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = os.environ | {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        return [subprocess.Popen([sys.executable, "-c", COLLECTIVES, how], text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)})
                for r in range(2)]

    dies, hangs = launch("dies"), launch("hangs")
    said = {}
    for how, (main, other) in (("dies", dies), ("hangs", hangs)):
        out, err = main.communicate(timeout=60)
        other.kill()
        assert main.returncode == 2, err
        gathered, lost = out.splitlines()
        assert gathered == "gathered [0.0, 10.0, 20.0, 30.0, 40.0] summed [3.0, 5.0]"
        assert other.communicate()[0].startswith(gathered)  # every process has the same numbers
        said[how] = lost
    for how, lost in said.items():  # gone: at once; hanging: at the timeout (here 3 s), not forever
        waited, message = lost.split("s: ", 1)
        assert int(waited.removeprefix("after ")) <= (0 if how == "dies" else 3) + 2, lost
        assert message == "another process of this run stopped, or did not answer within 0.05 minutes " \
                          "(Ranks 1 failed to pass monitoredBarrier in 3000 ms)", lost
