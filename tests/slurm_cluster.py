"""A real one-node SLURM cluster on this machine, for tests: private munged, slurmctld and slurmd, all state under
one temporary directory, free ports, so nothing of the system's configuration is touched.

Settings measured to work on a 2-core Debian 12 machine without systemd or cgroups (../shared notes): linuxproc
process tracking, no task/accounting plugins, requeue allowed, short credential expiry and scheduler interval so a
requeued job comes back in seconds. Needs root (slurmd launches jobs, munged runs as user munge) and Debian's
`slurmctld slurmd slurm-client munge` packages (.ci/run installs them).

    python tests/slurm_cluster.py start   # prints `export SLURM_CONF=...`; `stop DIR` stops it
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel", "srun")


def unavailable() -> str | None:
    """Why a cluster cannot be started here, or None."""
    missing = [p for p in PROGRAMS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} missing); as root: apt-get install -y "
                "--no-install-recommends slurmctld slurmd slurm-client munge (.ci/run does this where it can)")
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root (slurmd launches the jobs, munged runs as user munge)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _wait(what: str, ok, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(f"SLURM test cluster: {what} did not come up in {timeout:.0f} s")
        time.sleep(0.5)


class Cluster:
    """Start with `Cluster.start()`; `env` has SLURM_CONF for client commands; `stop()` ends every daemon."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    @classmethod
    def start(cls) -> Cluster:
        cluster = cls(Path(tempfile.mkdtemp(prefix="stdit-slurm-")))
        try:
            cluster._start()
        except Exception:
            cluster.stop()
            raise
        return cluster

    def _start(self) -> None:
        root, host = self.root, socket.gethostname().split(".")[0]
        munge = root / "munge"
        munge.mkdir()
        subprocess.run([_sbin("mungekey"), "--create", f"--keyfile={munge / 'munge.key'}"], check=True)
        os.chmod(root, 0o755)  # munged wants its socket's directories open to all, its own owned by it
        os.chmod(munge, 0o755)
        for path in (munge, munge / "munge.key"):
            shutil.chown(path, "munge", "munge")
        os.chmod(munge / "munge.key", 0o400)
        self.socket = munge / "munge.sock"
        subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged"), f"--socket={self.socket}",
                        f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
                        f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"], check=True)
        cores = os.cpu_count() or 1
        memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 20 * 0.8)
        for sub in ("state", "spool"):
            (root / sub).mkdir()
        self.conf.write_text("\n".join([
            "ClusterName=stdit-test", f"SlurmctldHost={host}",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CryptoType=crypto/munge",
            f"AuthInfo=socket={self.socket},cred_expire=10", "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MailProg=/bin/true",
            "JobRequeue=1", "SchedulerParameters=sched_interval=2,bf_interval=2", "KillWait=30",
            "ReturnToService=2", "InactiveLimit=0", "MinJobAge=600",
            f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
            f"NodeName={host} Sockets=1 CoresPerSocket={cores} ThreadsPerCore=1 RealMemory={memory} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")
        subprocess.run([_sbin("slurmctld"), "-f", str(self.conf)], check=True, env=self.env)
        _wait("slurmctld", lambda: "UP" in self.run("scontrol", "ping", check=False))
        subprocess.run([_sbin("slurmd"), "-f", str(self.conf)], check=True, env=self.env)
        _wait("slurmd", lambda: "idle" in self.run("sinfo", "-h", "-o", "%T", check=False))

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=False)
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
        return out.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RestartCnt, ExitCode, ...)."""
        fields = {}
        for word in self.run("scontrol", "show", "job", job_id).split():
            key, _, value = word.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_job(self, job_id: str, timeout: float = 300.0) -> dict[str, str]:
        """Poll until the job has ended (sbatch --wait polls too slowly); its last scontrol record."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout:.0f} s")
            time.sleep(1.0)

    def stop(self) -> None:
        """Cancel what is left, stop the daemons by their pid files, remove the directory."""
        if self.conf.exists():
            self.run("scancel", "--user=root", check=False)
            time.sleep(1.0)
        for pid_file in (self.root / "slurmd.pid", self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"):
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (FileNotFoundError, ValueError, ProcessLookupError):
                pass
        time.sleep(1.0)
        shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["start"]:
        c = Cluster.start()
        print(f"export SLURM_CONF={c.conf}")
    elif sys.argv[1:2] == ["stop"] and len(sys.argv) == 3:
        Cluster(Path(sys.argv[2])).stop()
    else:
        print(__doc__)
