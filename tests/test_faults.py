"""Bounded hangs and worker restarts (issue 14): a stopped rank makes the others exit within parallel.timeout_s
with one line naming it; torchrun --max-restarts restarts a group that lost a worker, which resumes from `latest`
to the uninterrupted run's losses; two torchrun agents on this machine (c10d rendezvous, as on two nodes) train
to the single-process losses.

Every process is started in a session of its own and killed with its process group at the end, whatever happens."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import free_port

from stdit.commands.train import collective_failure
from stdit.config import ConfigError, TrainingError, load_config
from stdit.train import Trainer

# the tiny FAST overrides of tests/test_checkpoint.py / tests/test_robustness.py (one block)
FAST = ["model.hidden_size=32", "model.depth=1", "model.num_heads=4", "data.resolutions=[[8,8],[8,16],[16,8]]",
        "data.frame_counts=[1,2,4]", "data.batch_size=6", "data.micro_batches=0", "data.token_budget=128",
        "data.num_samples=64",
        "text.hidden_size=16", "text.num_layers=1", "text.ff_size=32", "run.samples_at_end=0", "run.log_every=1",
        "optim.warmup_steps=2"]
STEPS = 10  # of the restart and rendezvous runs
RESTART = FAST + [f"run.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=10"]
TIMEOUT_S = 10
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TRAIN = ["-m", "stdit.train", "recipes/tiny.yaml"]


# --------------------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------------------

def _start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """CMD in a session (process group) of its own, stdout and stderr to LOG."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env or ENV, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)


def _children(pid: int) -> list[int]:
    """Child processes of PID (started by any of its threads)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _tree(pid: int) -> list[int]:
    """PID and all its descendants (torchrun starts each worker in a session of its own)."""
    out = [pid]
    for child in _children(pid):
        out += _tree(child)
    return out


def _kill_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every process group of PROCS and of their descendants, then reap PROCS."""
    pids = [pid for p in procs for pid in _tree(p.pid)]
    for pid in pids:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for p in procs:
        p.wait(timeout=30)
    left = [pid for pid in pids if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]
    assert not left, f"processes left behind: {left}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def _logged(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip().endswith("}")]


def _last_loss_per_step(run_dir: Path) -> dict[int, float]:
    """A restarted run logs the steps after its checkpoint again: the last value of each step is what it kept."""
    return {m["step"]: m["loss"] for m in _logged(run_dir)}


def _wait_for(what, procs: list[subprocess.Popen], logs: list[Path], limit_s: float = 180.0) -> None:
    """Poll until what() holds; fail with the logs if a process exits first or LIMIT_S passes."""
    start = time.monotonic()
    while not what():
        ended = [p for p in procs if p.poll() is not None]
        if ended or time.monotonic() - start > limit_s:
            tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
            pytest.fail(f"{'a process exited' if ended else 'timed out'} before the expected state\n{tails}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def two_agents(tmp_path_factory) -> dict[int, float]:
    """Per-step losses of a run by two torchrun agents (--nnodes 2, one process each) that meet at a c10d
    rendezvous on localhost, as two nodes would. The layout is dp=2 as under torchrun --nproc-per-node 2 (the
    launcher only decides how the processes find each other), so it is also the uninterrupted run that the
    restart test compares with."""
    run = tmp_path_factory.mktemp("two-agents")
    port, rdzv_id, procs, logs = free_port(), f"stdit-{uuid.uuid4().hex[:8]}", [], []
    try:
        for node in range(2):
            logs.append(run / f"agent{node}.log")
            procs.append(_start([*TORCHRUN, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                                 f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}",
                                 f"--rdzv-conf=is_host={int(node == 0)}", "--local-addr=127.0.0.1", "--max-restarts=0",
                                 *TRAIN, *RESTART, f"run.dir={run / 'job'}"], logs[-1]))
        rcs = [p.wait(timeout=300) for p in procs]
    finally:
        _kill_all(procs)
    assert rcs == [0, 0], "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
    losses = _last_loss_per_step(run / "job")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


# --------------------------------------------------------------------------------------------------------------
# parallel.timeout_s
# --------------------------------------------------------------------------------------------------------------

def test_timeout_key_is_validated():
    assert load_config("recipes/tiny.yaml").parallel.timeout_s == 1800.0
    assert load_config("recipes/tiny.yaml", ["parallel.timeout_s=2.5"]).parallel.timeout_s == 2.5
    for bad in ("0", "-1"):
        with pytest.raises(ConfigError, match=r"parallel.timeout_s: must be > 0 seconds, got -?\d"):
            load_config("recipes/tiny.yaml", [f"parallel.timeout_s={bad}"])


def test_process_group_errors_become_one_line(monkeypatch):
    """gloo's errors as the trainer sees them: a timeout names parallel.timeout_s, a vanished peer says so,
    anything else is left alone."""
    for var in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    timed_out = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                             "10000ms for recv operation to complete")
    error = str(collective_failure(timed_out, 10.0))
    assert error.startswith("rank 0: a collective waited longer than parallel.timeout_s=10 s for the other processes "
                            "(Timed out waiting 10000ms for recv operation to complete)") and "\n" not in error
    closed = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                          "[127.0.0.1]:13237. This is typically caused by a remote worker crashing. GLHF!")
    assert "another process of the run exited during a collective (Connection closed by peer [127.0.0.1]:13237)" \
        in str(collective_failure(closed, 10.0))
    assert collective_failure(RuntimeError("DataLoader timed out after 5 seconds"), 10.0) is None
    assert collective_failure(TrainingError("3 step(s) in a row ... timed out"), 10.0) is None


def test_stopped_rank_ends_the_others_within_the_timeout(tmp_path):
    """SIGSTOP rank 1 mid-run: rank 0's next collective waits parallel.timeout_s, then it exits with status 2 and
    one line naming the key (no traceback); rank 1, still stopped, is killed."""
    port, procs, logs = str(free_port()), [], []
    args = [*FAST, "run.steps=100000", f"parallel.timeout_s={TIMEOUT_S}", f"run.dir={tmp_path}"]
    try:
        for rank in range(2):  # as torchrun starts them, without the agent: each rank's own exit is what we see
            env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": port}
            logs.append(tmp_path / f"rank{rank}.log")
            procs.append(_start([sys.executable, *TRAIN, *args], logs[-1], env))
        _wait_for(lambda: len(_logged(tmp_path)) >= 2, procs, logs)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            rc = procs[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still running 60 s after rank 1 stopped\n{logs[0].read_text()[-3000:]}")
        waited = time.monotonic() - stopped
        out = logs[0].read_text()
        assert _state(procs[1].pid) == "T"  # rank 1 never ran again
    finally:
        _kill_all(procs)
    assert rc == 2, out[-3000:]
    assert TIMEOUT_S / 2 <= waited < 60, waited
    errors = re.findall(r"stdit train: error: [^\r\n]*", out)  # may follow rank 0's progress bar on its line
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert f"waited longer than parallel.timeout_s={TIMEOUT_S} s" in errors[0], errors[0]
    assert "stopped, hung or unreachable" in errors[0]


# --------------------------------------------------------------------------------------------------------------
# torchrun --max-restarts
# --------------------------------------------------------------------------------------------------------------

def test_torchrun_restarts_a_killed_worker_and_resumes_exactly(two_agents, tmp_path):
    """kill -9 one worker once a checkpoint exists: torchrun restarts the group, which resumes from `latest`;
    every step's (last) loss equals the uninterrupted run's (same layout), bit for bit."""
    log = tmp_path / "torchrun.log"
    p = _start([*TORCHRUN, "--nproc-per-node=2", "--max-restarts=1", "--monitor-interval=0.2",
                f"--master-port={free_port()}", *TRAIN, *RESTART, f"run.dir={tmp_path}"], log)
    try:
        _wait_for(lambda: len(_logged(tmp_path)) >= 3 and (tmp_path / "checkpoints" / "latest").exists(), [p], [log])
        killed_after = max(m["step"] for m in _logged(tmp_path))
        workers = [c for c in _children(p.pid) if "stdit.train" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        rc = p.wait(timeout=300)
    finally:
        _kill_all([p])
    out = log.read_text()
    assert rc == 0, out[-3000:]
    assert killed_after < STEPS, "the run ended before the worker was killed"
    resumed = [line for line in out.splitlines() if line.startswith("resumed from")]
    assert resumed and "(same layout)" in resumed[0], out[-3000:]
    steps = [m["step"] for m in _logged(tmp_path)]
    assert len(steps) > len(set(steps)) or int(resumed[0].split(" at step ")[1].split()[0]) == killed_after
    assert _last_loss_per_step(tmp_path) == two_agents


# --------------------------------------------------------------------------------------------------------------
# Two agents, c10d rendezvous
# --------------------------------------------------------------------------------------------------------------

def test_two_agent_rendezvous_trains_to_the_single_process_losses(two_agents, tmp_path):
    """The two agents' job (fixture two_agents) trains to the single-process losses, within 1e-4
    (tests/test_layouts.py's tolerance)."""
    Trainer(load_config("recipes/tiny.yaml", [*RESTART, f"run.dir={tmp_path}"])).train()
    one = _last_loss_per_step(tmp_path)
    assert sorted(one) == sorted(two_agents)
    for step, loss in one.items():
        assert abs(two_agents[step] - loss) <= 1e-4 * abs(loss), (step, two_agents[step], loss)
