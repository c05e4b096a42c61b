"""Data-parallel runs under torchrun, on the CPU with gloo over loopback: the same results as one process, one
run directory, the same feature cache, an interrupted run resumed, and two "machines" that meet by c10d
rendezvous.

Every torchrun start costs several seconds (each process imports torch), so each run below serves several
assertions through a module-scoped fixture.
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
RESUME = "continue with `transferlab train --resume {}`"


def torchrun(*argv: str, launch: tuple[str, ...] = ("--standalone", "--nproc-per-node", "2"), cwd: Path,
             wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    """`torchrun LAUNCH -m transferlab ARGV` in `cwd` (its own feature cache there), output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "transferlab", *argv]
    env = os.environ | {"TRANSFERLAB_CACHE": str(cwd / "default-cache")}
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(command, cwd=cwd, env=env, text=True, capture_output=True, timeout=300)


def said(stderr: str) -> list[str]:
    """transferlab's own lines among torchrun's (its warnings, its report of a failed process)."""
    return [line for line in stderr.splitlines() if line.startswith("transferlab:")]


def ours_raised(stderr: str) -> bool:
    """Whether a transferlab process printed a traceback (torchrun prints its own when a process fails)."""
    return any("transferlab/" in line and line.lstrip().startswith("File ") for line in stderr.splitlines())


def run_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def within_one_image(a: dict, b: dict) -> bool:
    return a["n_images"] == b["n_images"] and abs(a["accuracy"] - b["accuracy"]) * a["n_images"] <= 1 + 1e-9


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    make_folder(root / "data")
    make_folder(root / "test", per_class=4, seed=1)
    return root


@pytest.fixture(scope="module")
def one_process(root) -> tl.Run:
    return tl.train(root / "data", out=root / "one" / "run", strategy="partial", cache_dir=str(root / "cache-one"),
                    **ONE)


@pytest.fixture(scope="module")
def two_machines(root) -> list[subprocess.CompletedProcess]:
    """`train` in two torchrun invocations of one process each, as on two machines: --nnodes 2, c10d
    rendezvous on a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = ("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
              f"127.0.0.1:{port}", "--rdzv-id", "two-machines")
    argv = ("train", "--data", str(root / "data"), "--out", str(root / "two" / "run"), "--strategy", "partial",
            "--cache-dir", str(root / "cache-two"), *flags(TWO))
    machines = [torchrun(*argv, launch=launch, cwd=root, wait=False) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in machines]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(machines, outputs)]


def test_two_machines_train_one_run_as_one_process_does(two_machines, one_process, root):
    for machine in two_machines:
        assert machine.returncode == 0 and not ours_raised(machine.stderr), machine.stderr
    assert sum("-> " in m.stdout for m in two_machines) == 1  # only the main process prints the result
    assert run_dirs(root / "two") == ["run"] and os.listdir(root / "two") == ["run"]  # nothing left beside it
    two = tl.load(root / "two" / "run")
    assert two.info["device"]["processes"] == 2 and one_process.info["device"]["processes"] == 1
    assert within_one_image(two.metrics, one_process.metrics), (two.metrics, one_process.metrics)


def test_the_sharded_cache_is_the_single_process_cache(two_machines, one_process, root):
    one, two = ({p.name: np.load(p) for p in (root / name).glob("*.npy")} for name in ("cache-one", "cache-two"))
    assert one.keys() == two.keys() and len(one) == 2  # train and validation features, no parts left
    for name in one:  # equal up to fp16 rounding: oneDNN's sums round by thread count and batch size
        assert np.allclose(one[name], two[name], rtol=2e-3, atol=1e-3), name
    again = tl.train(root / "data", strategy="partial", cache_dir=str(root / "cache-two"), **ONE)
    assert again.info["cache"]["misses"] == 0  # one process reuses two's


@pytest.fixture(scope="module")
def compared(root, one_process) -> tuple[subprocess.CompletedProcess, tl.Comparison]:
    """compare with two processes (on the cache one process wrote), and with one."""
    one_cache = str(root / "cache-one")
    strategies = ["feature-extraction", "partial"]
    two = torchrun("compare", "--data", str(root / "data"), "--test", str(root / "test"), "--strategies",
                   ",".join(strategies), "--out", str(root / "compare-two"), "--cache-dir", one_cache, *flags(TWO),
                   cwd=root)
    one = tl.compare(root / "data", strategies, root / "compare-one", test=root / "test",
                     cache_dir=str(root / "cache-compare-one"), **ONE)
    return two, one


def test_compare_with_two_processes_writes_one_comparison_as_one_process_does(compared, one_process, root):
    two, one = compared
    assert two.returncode == 0 and not ours_raised(two.stderr), two.stderr
    assert two.stdout.count("best: ") == 1
    out = root / "compare-two"
    assert run_dirs(out) == ["feature-extraction", "partial"]
    assert sorted(os.listdir(out)) == ["comparison.csv", "comparison.json", "feature-extraction", "partial", "plots",
                                       "report.html", "report.md"]
    rows = {r["strategy"]: r for r in json.loads((out / "comparison.json").read_text())["strategies"]}
    for name, row in rows.items():
        mine = next(r for r in one.rows if r["strategy"] == name)
        for split, images in (("val", one.splits.val), ("test", one.splits.test)):
            assert abs(row[f"{split}_accuracy"] - mine[f"{split}_accuracy"]) * len(images) <= 1 + 1e-9, name
    assert rows["partial"]["features_computed"] == 0  # two processes read the features one process wrote


def test_pure_shares_cover_every_image_once_and_splits_keep_the_global_batch(monkeypatch):
    for world in (2, 3):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        shares = distributed.shares(10, seed=4)
        assert sorted(sum(shares, [])) == list(range(10)) and max(map(len, shares)) - min(map(len, shares)) <= 1
        assert all(s == sorted(s) for s in shares) and shares == distributed.shares(10, seed=4)
        order = list(np.random.default_rng(0).permutation(11))
        parts = []
        for rank in range(world):
            monkeypatch.setenv("RANK", str(rank))
            parts.append(distributed.split(order))
        assert len({len(p) for p in parts}) == 1  # as many steps in every process
        for k in range(0, len(parts[0]), 2):  # global batch k of 2 per process = one process's batch k
            got = sorted(x for p in parts for x in p[k:k + 2])
            assert got == sorted((order + order)[k * world:(k + 2) * world])


@pytest.fixture(scope="module")
def interrupted(root) -> tuple[Path, subprocess.CompletedProcess]:
    """Full fine-tuning with two processes, stopped by SIGTERM to the second after the first checkpoint."""
    run_dir = root / "stopped" / "run"
    process = torchrun("train", "--data", str(root / "data"), "--out", str(run_dir), "--strategy", "full",
                       *flags(TWO | {"epochs": 8, "patience": 0}), cwd=root, wait=False)
    deadline = time.monotonic() + 240
    while not checkpoint_path(run_dir).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(_rank_pid(process.pid, 1), signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    return run_dir, subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _rank_pid(torchrun_pid: int, rank: int) -> int:
    """The process torchrun started for `rank` (Linux: its children, by their environment)."""
    children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    return next(int(c) for c in children
                if f"RANK={rank}".encode() in Path(f"/proc/{c}/environ").read_bytes().split(b"\0"))


def test_sigterm_to_one_process_stops_all_with_a_checkpoint_that_resumes(interrupted, root, capsys):
    run_dir, stopped = interrupted
    assert stopped.returncode != 0 and not ours_raised(stopped.stderr), stopped.stderr
    [line] = said(stopped.stderr)  # the main process says it, once
    assert line.endswith(RESUME.format(run_dir)), line
    assert not run_dir.exists() and os.listdir(run_dir.parent) == [checkpoint_path(run_dir).name]

    assert cli.main(["train", "--resume", str(run_dir)]) == 2  # one process cannot continue what two began
    assert "under torchrun with 2 processes" in error_line(capsys)
    resumed = torchrun("train", "--resume", str(run_dir), cwd=root)
    assert resumed.returncode == 0 and not ours_raised(resumed.stderr), resumed.stderr
    assert os.listdir(run_dir.parent) == ["run"]
    run = tl.load(run_dir)
    assert [int(row["epoch"]) for row in run.history] == list(range(1, 9)) and run.info["device"]["processes"] == 2
