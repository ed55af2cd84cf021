"""A warm launcher for the multi-process tests: one interpreter imports torch, DeepSpeed, megatron-core,
transformers and stdit once (~10 s of CPU per process on a CI machine), then forks the ranks of each job from it.

Every rank is a fresh fork of an interpreter that has imported modules and done nothing else: no process group,
no tensor op (so no OpenMP thread pool, which a forked child could not use), no seeds drawn. A rank finds the
others as under srun or torchrun without its agent: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and a free
MASTER_PORT in its environment (env:// rendezvous), OMP_NUM_THREADS=1 as torchrun sets it, stdout and stderr to
files. What a job runs is what a launched process would: `stdit train ARGS` (stdit.cli.main, the entry of
`python -m stdit.train`), any `stdit ...` command on one process, or a module-level function
`module:name(rank, *args)` (the tests' mp.spawn workers).

Launchers themselves are tested elsewhere, each by a process of its own: torchrun (tests/test_faults.py: restarts
and a two-agent rendezvous; tests/test_train.py, tests/test_recompute.py), srun (tests/test_slurm.py and the
srun-style tasks of tests/test_layouts.py / tests/test_checkpoint.py), DeepSpeed's launcher (tests/test_layouts.py).

    with Zygote() as z:
        rc, out, err = z.train(4, ["recipes/tiny.yaml", "parallel.tp=2", ...])
        rc, out, err = z.cli(["ckpt", "info", run_dir])                 # one process
        rc, out, err = z.call(2, "test_dsp:_worker", (2, port, ...))   # the function gets (rank, *args)

The server side is this file run as a script (`python tests/zygote.py`): JSON requests on stdin, one JSON reply
per line on stdout.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPLIES = -1  # the server's descriptor for its replies
ROOT = TESTS.parent


class Zygote:
    """The client: starts the server on first use; `close()` (or the with block's end) stops it."""

    def __init__(self):
        self.proc = None
        self.logs = Path(tempfile.mkdtemp(prefix="stdit-zygote-"))
        self.count = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _server(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
                [str(TESTS), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], cwd=ROOT, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         stderr=open(self.logs / "server.log", "a"))
        return self.proc

    def _run(self, request: dict, timeout: float) -> tuple[int, str, str]:
        self.count += 1
        job = self.logs / f"job{self.count}"
        job.mkdir()
        request = {**request, "logs": str(job), "timeout": timeout, "cwd": os.getcwd(),
                   "env": {**os.environ, "OMP_NUM_THREADS": "1", **request.get("env", {})}}
        server = self._server()
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        line = server.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote server exited: {(self.logs / 'server.log').read_text()[-3000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"zygote: {reply['error']}")
        ranks = range(request["nproc"])
        read = lambda kind: "".join((job / f"rank{r}.{kind}").read_text(errors="replace") for r in ranks)  # noqa
        return reply["rc"], read("out"), read("err")

    def train(self, nproc: int, args: list[str], env: dict | None = None, timeout: float = 600
              ) -> tuple[int, str, str]:
        """`stdit train ARGS` on NPROC ranks: (the worst exit status, the ranks' stdout, their stderr), rank 0
        first. A rank that exits non-zero ends the job: the others are killed."""
        return self._run({"nproc": nproc, "train": list(args), "env": env or {}}, timeout)

    def cli(self, argv: list[str], env: dict | None = None, timeout: float = 600) -> tuple[int, str, str]:
        """`stdit ARGV` (or `python -m stdit.cli ARGV`) as one process: (exit status, stdout, stderr)."""
        return self._run({"nproc": 1, "cli": list(argv), "env": env or {}}, timeout)

    def call(self, nproc: int, target: str, args: tuple = (), timeout: float = 600) -> tuple[int, str, str]:
        """`module:function(rank, *ARGS)` on NPROC ranks, as torch.multiprocessing.spawn calls it."""
        return self._run({"nproc": nproc, "call": target, "args": pickle.dumps(args).hex()}, timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.logs, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(request: dict, rank: int, port: int) -> None:
    """In the forked child: become rank RANK of the job, run it, exit with its status (never returns)."""
    code = 1
    try:
        os.close(REPLIES)
        os.setsid()  # a group of its own: the job's end kills whatever it started
        logs = Path(request["logs"])
        for fd, kind in ((1, "out"), (2, "err")):
            f = os.open(logs / f"rank{rank}.{kind}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.chdir(request["cwd"])
        env = dict(request["env"])
        for key in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
            env.pop(key, None)
        env.update(RANK=str(rank), WORLD_SIZE=str(request["nproc"]), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.environ.clear()
        os.environ.update(env)
        import torch
        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
        try:
            if "train" in request or "cli" in request:
                argv = ["train", *request["train"]] if "train" in request else request["cli"]
                sys.argv = ["stdit", *argv]
                from stdit.cli import main
                main(argv)
            else:
                import importlib
                module, name = request["call"].split(":")
                getattr(importlib.import_module(module), name)(rank, *pickle.loads(bytes.fromhex(request["args"])))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        try:
            import atexit
            atexit._run_exitfuncs()
        except BaseException:
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code)


def _job(request: dict) -> int:
    port, pids = _free_port(), []
    for rank in range(request["nproc"]):
        pid = os.fork()
        if pid == 0:
            _rank(request, rank, port)
        pids.append(pid)
    codes, deadline = {}, time.monotonic() + request["timeout"]
    while len(codes) < len(pids):
        done = False
        for pid in pids:
            if pid in codes:
                continue
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                codes[pid] = os.waitstatus_to_exitcode(status)
                done = True
        failed = any(c != 0 for c in codes.values())
        if failed or time.monotonic() > deadline:  # as torchrun: one rank's failure ends the others
            for pid in pids:
                if pid not in codes:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            for pid in pids:
                if pid not in codes:
                    codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) or -signal.SIGKILL
            if not failed:
                codes[pids[0]] = 124  # timed out
            break
        if not done:
            time.sleep(0.05)
    for pid in pids:  # whatever a rank started in its group (data workers): gone with it
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return max(codes.values(), key=abs)


def serve() -> None:
    global REPLIES
    REPLIES = os.dup(1)  # the replies' own descriptor: what the imports or the jobs print goes to stderr
    os.dup2(2, 1)
    os.chdir(ROOT)
    sys.path[:0] = [str(TESTS), str(ROOT)]
    # everything a rank imports, once; no tensor op here (a forked child could not use an OpenMP pool)
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401
    import deepspeed  # noqa: F401
    import megatron.core.parallel_state  # noqa: F401
    import megatron.core.tensor_parallel  # noqa: F401
    import transformers as tf
    for name in ("T5Config", "T5EncoderModel", "PreTrainedTokenizerFast"):
        getattr(tf, name)
    import deepspeed.pipe  # noqa: F401
    import deepspeed.runtime.pipe.topology  # noqa: F401
    import deepspeed.sequence.layer  # noqa: F401
    import deepspeed.utils  # noqa: F401
    import stdit.cli  # noqa: F401
    import stdit.train  # noqa: F401
    import parallel.checkpoint  # noqa: F401
    import parallel.engine  # noqa: F401
    import parallel.pipeline  # noqa: F401
    import parallel.tensor  # noqa: F401
    out = os.fdopen(REPLIES, "w")
    for line in sys.stdin:
        try:
            reply = {"rc": _job(json.loads(line))}
        except Exception as e:  # noqa: BLE001
            reply = {"error": repr(e)}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    serve()
