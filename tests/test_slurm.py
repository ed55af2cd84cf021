"""SLURM recipes on a real scheduler: a one-node cluster started on this machine (tests/slurm_cluster.py) runs the
project's own slurm/train.sbatch, rendered and submitted by `stdit slurm submit`.

- a 2-task job (one srun task per process) trains the tiny recipe to completion;
- a job (torchrun launcher) gets USR1 mid-run as SLURM sends it before a time limit (`scancel --signal=USR1
  --batch`), checkpoints, requeues itself, resumes from `latest` and finishes with the same losses, step by step,
  as the uninterrupted job;
- a chain of two jobs (slurm/chain.sh): the first is signalled and stops, the second resumes and finishes.
Skipped, with the reason, where SLURM cannot be installed or started (not root, no packages)."""
import contextlib
import io
import json
import subprocess
import time
from pathlib import Path

import pytest
from slurm_cluster import Cluster, unavailable

from stdit.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model.hidden_size=32", "model.depth=2", "model.num_heads=4", "data.resolutions=[[8,8],[8,16],[16,8]]",
        "data.frame_counts=[1,2,4]", "data.batch_size=6", "data.micro_batches=0", "data.token_budget=128",
        "data.num_samples=64",
        "text.hidden_size=16", "text.num_layers=1", "text.ff_size=32", "run.samples_at_end=0", "run.log_every=1",
        "optim.warmup_steps=2", "checkpoint.every=0", "parallel.zero=1"]
STEPS = 30  # ~10 steps/s: long enough that a signal sent after step 3 lands mid-run
CPU_JOB = ["--gpus-per-node", "0", "--procs-per-node", "2", "--time", "10:00"]


def stdit(capsys, *args: str) -> tuple[int, str, str]:
    """`stdit ARGS` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


# ----------------------------------------------------------------------------------------------------------
# Rendering and the layout check (no cluster needed)
# ----------------------------------------------------------------------------------------------------------

def test_submit_renders_the_script_for_the_allocation(tmp_path, capsys):
    run_dir = tmp_path / "x"
    code, script, err = stdit(capsys, "slurm", "submit", "recipes/tiny.yaml", "parallel.tp=2", f"run.dir={run_dir}",
                              "data.micro_batches=4",
                              "--nodes", "2", "--gpus-per-node", "4", "--time", "4:00:00", "--partition", "gpu",
                              "--account", "vid", "--dry-run")
    assert code == 0, err
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --time=4:00:00", "#SBATCH --signal=B:USR1@300",
                 "#SBATCH --requeue", "#SBATCH --partition=gpu", "#SBATCH --account=vid",
                 f"#SBATCH --output={run_dir / 'slurm/%j.log'}", f"#SBATCH --chdir={ROOT}",
                 'export STDIT_LAUNCHER="torchrun"', 'export STDIT_PROCS_PER_NODE="4"',
                 f"set -- recipes/tiny.yaml parallel.tp=2 run.dir={run_dir} data.micro_batches=4"):
        assert line in script.splitlines(), line
    assert script.count("#SBATCH --nodes") == 1  # the template's defaults are replaced, not repeated
    assert "layout tp2.pp1.cp1.dp4.zero0 on 2 node(s) x 4 = 8 processes" in err
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert subprocess.run(["bash", "-n", str(ROOT / "slurm/chain.sh")]).returncode == 0
    assert list(run_dir.rglob("*")) == [run_dir / "slurm"]  # a dry run only makes the log directory SLURM needs


@pytest.mark.parametrize("args, message", [
    (["parallel.tp=3", "--gpus-per-node", "2", "--nodes", "2"], "parallel.tp * parallel.pp * parallel.cp = 3*1*1"),
    (["parallel.tp=8", "--gpus-per-node", "8"], "model.num_heads=4 is not divisible by parallel.tp"),
    (["--gpus-per-node", "0"], "--procs-per-node"),
    (["--gpus-per-node", "4", "--procs-per-node", "2"], "one process per GPU"),
    (["parallel.tpp=2", "--gpus-per-node", "1"], "unknown config key `parallel.tpp`"),
])
def test_submit_refuses_a_layout_that_does_not_fit(args, message, capsys):
    code, out, err = stdit(capsys, "slurm", "submit", "recipes/tiny.yaml", "--time", "1:00:00", "--dry-run", *args)
    assert code == 2 and message in err, err
    assert "#SBATCH" not in out


# ----------------------------------------------------------------------------------------------------------
# A real cluster
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    c = Cluster.start()
    with pytest.MonkeyPatch.context() as mp:  # sbatch here, and the jobs' environment (sbatch passes it on)
        mp.setenv("SLURM_CONF", str(c.conf))
        mp.setenv("OMP_NUM_THREADS", "1")
        # what a one-process DeepSpeed run leaves in os.environ (and an earlier test in this process did): the
        # batch script must not let it override srun's SLURM_PROCID / SLURM_NTASKS
        mp.setenv("RANK", "0")
        mp.setenv("WORLD_SIZE", "1")
        mp.setenv("MASTER_PORT", "29500")
        yield c
    c.stop()


def submit(run_dir: Path, *options: str, dry_run: bool = False) -> str:
    """`stdit slurm submit` of the tiny recipe on the test cluster: the job id (with dry_run: the script)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["slurm", "submit", "recipes/tiny.yaml", *FAST, f"run.dir={run_dir}", f"run.steps={STEPS}", *CPU_JOB,
              *options] + ["--dry-run"] * dry_run)
    return out.getvalue() if dry_run else out.getvalue().split()[2].rstrip(";")  # "submitted job N; log ..."


def signal_after(cluster: Cluster, job: str, run_dir: Path, steps: int = 3, timeout: float = 180.0) -> None:
    """USR1 to the batch shell, as SLURM's --signal=B:USR1@... does before a time limit, once training runs."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert time.monotonic() < deadline, f"job {job} logged no {steps} steps in {timeout:.0f} s\n" + \
            job_log(run_dir, job)
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", job)


@pytest.fixture(scope="module")
def straight(cluster, tmp_path_factory):
    """The tiny recipe as a 2-task job (srun starts both processes), uninterrupted."""
    run_dir = tmp_path_factory.mktemp("straight")
    job = submit(run_dir, "--launcher", "srun")
    return job, cluster.wait_job(job), run_dir


def job_log(run_dir: Path, job: str) -> str:
    """The job's log (what the batch script and the trainer printed), for failure messages."""
    log = run_dir / "slurm" / f"{job}.log"
    return log.read_text()[-4000:] if log.exists() else f"(no {log})"


def test_two_task_job_trains_to_completion(straight):
    job, info, run_dir = straight
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", \
        (info["JobState"], info["ExitCode"], job_log(run_dir, job))
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    log = (run_dir / "slurm" / f"{job}.log").read_text()
    assert f"=== finished: step {STEPS} of {STEPS} (exit 0)" in log
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    layout = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["layout"]
    assert layout == "tp1.pp1.cp1.dp2.zero1"  # two processes


def test_signalled_job_checkpoints_requeues_and_resumes(cluster, straight, tmp_path):
    job = submit(tmp_path, "--launcher", "torchrun")
    signal_after(cluster, job, tmp_path)
    info = cluster.wait_job(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", info
    log = (tmp_path / "slurm" / f"{job}.log").read_text()
    stopped = int(log.split("=== requeued at step ")[1].split()[0])
    assert 3 <= stopped < STEPS
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{stopped:08d}'}" in log and "(same layout)" in log
    assert f"=== finished: step {STEPS} of {STEPS} (exit 0)" in log
    assert losses(tmp_path) == losses(straight[2])  # every step's loss is the uninterrupted job's, bit for bit


def test_dependency_chain_continues_where_the_previous_job_stopped(cluster, straight, tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(submit(tmp_path, "--launcher", "srun", dry_run=True))
    chain = subprocess.run([str(ROOT / "slurm/chain.sh"), "2", str(script)], capture_output=True, text=True,
                           cwd=ROOT, check=True).stdout
    first, second = [line.split()[-1] for line in chain.splitlines()]
    signal_after(cluster, first, tmp_path)
    assert cluster.wait_job(first)["JobState"] == "COMPLETED"
    info = cluster.wait_job(second)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", info
    first_log = (tmp_path / "slurm" / f"{first}.log").read_text()
    assert "the next job of the chain continues" in first_log and "requeued" not in first_log
    assert f"=== finished: step {STEPS} of {STEPS}" in (tmp_path / "slurm" / f"{second}.log").read_text()
    assert losses(tmp_path) == losses(straight[2])
