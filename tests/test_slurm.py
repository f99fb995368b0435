"""slurm/: the real batch scripts on a real Slurm, started by this module.

A module-scoped fixture starts slurmctld and two slurmd (nodes n1, n2, both 127.0.0.1, on free
ports) from a generated slurm.conf in a temporary directory, as root, and stops them at the
end, also after a failure. The jobs run the real `slurm/train.sbatch` and `slurm/prep.sbatch`:
2 nodes x 1 task, gloo on CPU, configs/mock-tiny.yaml (fp32 on CPU). Every check reads the
job's own files (its log in the run dir, train.log, losses.jsonl, exit.json, checkpoints),
not only Slurm's job state: a job whose plugins fail can end COMPLETED having run nothing.

Skipped without slurm-wlm (`apt-get install slurm-wlm`; `.ci/run` installs it when it can) or
when not root. The test cluster differs from a real one in one setting: `AuthInfo=cred_expire=5`,
so that a requeued job may start again after ~6 s instead of Slurm's 120 s default (the hold
that keeps a requeued job's old credentials from being reused); the scripts do nothing
special about it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import runs

REPO = runs.REPO
MOCK = "configs/mock-tiny.yaml"
STEPS = 200  # 30-80 ms each here: the stop signal (after step 30) lands long before the end
SAVE_INTERVAL = 25
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")


# ---- the cluster ------------------------------------------------------------------------------

def _why_no_slurm() -> str | None:
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} not found): apt-get install "
                "slurm-wlm (.ci/run does when it runs as root with apt)")
    if os.geteuid() != 0:
        return "the test's slurmd must run as root (it starts jobs as the submitting user)"
    return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_ports(count: int, start: int) -> int:
    """The first of `count` consecutive free ports at or above `start`."""
    port = start
    while not all(_port_free(port + i) for i in range(count)):
        port += count
    return port


SLURM_CONF = """\
ClusterName=jrttest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
# no munge, no cgroups, no systemd (cgroup plugins fail silently here: jobs end COMPLETED
# with no output)
AuthType=auth/none
CredType=cred/none
# a requeued job may start again after cred_expire + 1 s (default 120; 5 is the least)
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
FirstJobId={first_job}
MinJobAge=900
KillWait=10
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{node_port}-{node_port_2}] CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=test Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """slurmctld + slurmd n1, n2 on this host; `sbatch`, `job`, `wait_*` for the tests."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.daemons: list[subprocess.Popen] = []
        self.jobs: list[str] = []
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SLURM_") and k not in
               ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT")}
        # The jobs inherit this (sbatch --export=ALL): this Python, the repository, one thread.
        env.update(SLURM_CONF=str(self.conf), JRT_PYTHON=sys.executable, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(
                       os.pathsep))
        self.env = env

    # -- daemons
    def start(self) -> None:
        (self.root / "state").mkdir()
        ctld_port = _free_ports(1, 16800 + os.getpid() % 2000)
        node_port = _free_ports(2, ctld_port + 1)
        # the trainers' master port is 15000 + job id % 20000: ids 5000.. give ports 20000..,
        # away from the daemons' and the ephemeral ones; start where the next 30 are free
        first_job = 5000 + os.getpid() % 11000
        while not all(_port_free(15000 + (first_job + i) % 20000) for i in range(30)):
            first_job += 30
        self.conf.write_text(SLURM_CONF.format(
            root=self.root, ctld_port=ctld_port, node_port=node_port,
            node_port_2=node_port + 1, first_job=first_job))
        self._daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in ("n1", "n2"):
            self._daemon(f"slurmd-{node}", ["slurmd", "-D", "-f", str(self.conf), "-N", node])
        self.wait_for(lambda: self.idle_nodes() == 2, 60, "both nodes idle")

    def _daemon(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / f"{name}.console", "w")
        self.daemons.append(subprocess.Popen(cmd, env=self.env, stdout=out,
                                             stderr=subprocess.STDOUT))

    def idle_nodes(self) -> int:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout
        return sum(line.split()[1] == "idle" for line in out.splitlines() if line.split())

    def stop(self) -> None:
        for job in self.jobs:
            self.run(["scancel", job], check=False)
        deadline = time.monotonic() + 30
        while self.jobs and time.monotonic() < deadline:
            if not self.run(["squeue", "-h"], check=False).stdout.strip():
                break
            time.sleep(0.5)
        for proc in self.daemons:
            proc.terminate()
        for proc in self.daemons:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def diagnostics(self) -> str:
        """The daemons' state and log tails, for a failure message."""
        parts = []
        for proc in self.daemons:
            parts.append(f"{proc.args[0]} {proc.args[-1]}: exit {proc.poll()}")
        for log in sorted(self.root.glob("*.log")):
            parts.append(f"--- {log.name} (tail)\n" + "\n".join(
                log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    # -- commands
    def run(self, cmd: list[str], check: bool = True, env: dict | None = None):
        result = subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        if check and result.returncode:
            pytest.fail(f"{' '.join(cmd)}: exit {result.returncode}\n{result.stdout}"
                        f"{result.stderr}\n{self.diagnostics()}", pytrace=False)
        return result

    def sbatch(self, script: str, args: list[str], *, options: list[str] = (),
               env: dict | None = None) -> str:
        """Submit `script` from the repository root; the job id. Its Slurm output file is
        root/sbatch-<id>.out; the job's own log goes to <run_dir>/slurm-<id>.out."""
        cmd = ["sbatch", "--parsable", f"--output={self.root}/sbatch-%j.out", *options,
               script, *args]
        job = self.run(cmd, env=env).stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Reason, Restarts, ExitCode, NumNodes, ...)."""
        out = self.run(["scontrol", "-o", "show", "job", job]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            dead = [p.args[0] for p in self.daemons if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                pytest.fail(f"waiting for {what}: {'daemon died: ' + str(dead) if dead else ''}"
                            f"timed out after {timeout} s\n{self.diagnostics()}", pytrace=False)
            time.sleep(0.1)

    def wait_end(self, job: str, log: Path | None = None, timeout: float = 180) -> dict:
        """Until the job has ended for good (not requeued); its record."""
        final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
        state: dict = {}
        since: list[float] = []

        def ended() -> bool:  # in a final state, and still so a second later (a settled record)
            state.clear()
            state.update(self.job(job))
            if state.get("JobState") not in final:
                since.clear()
                return False
            since.append(time.monotonic())
            return since[-1] - since[0] >= 1

        try:
            self.wait_for(ended, timeout, f"job {job} to end")
        except BaseException:
            if log is not None and log.exists():
                print(f"--- {log}\n{log.read_text(errors='replace')}")
            raise
        return state


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = _why_no_slurm()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# ---- runs -------------------------------------------------------------------------------------

TEST_NODE_OPTIONS = [  # what differs from train.sbatch's GPU defaults on this 2-node CPU cluster
    "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=30"]


def train_args(run_dir: Path, **extra) -> list[str]:
    values = {"training.train_steps": STEPS, "optimizer.decay_steps": STEPS,
              "checkpoint.save_interval": SAVE_INTERVAL, "checkpoint.resume": "auto",
              "training.log_interval": SAVE_INTERVAL, **extra}
    args = [MOCK]
    for item in runs.overrides(run_dir, **values):
        args += ["--set", item]
    return args


def expect_state(state: dict, *, log: str, **expected: str) -> None:
    """The job record has these values; else fail with the record and the job's log."""
    got = {key: state.get(key) for key in expected}
    assert got == expected, f"job record {state}\n--- the job's log:\n{log}"


def job_log(run_dir: Path, job: str) -> str:
    path = run_dir / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def rows_logged(run_dir: Path) -> int:
    path = run_dir / "losses.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def stop_after_a_checkpoint(slurm: Cluster, job: str, run_dir: Path) -> None:
    """Once the job has saved a checkpoint and trained on, send the preemption signal to the
    batch shell and every task (`scancel --signal=USR1 --full`)."""
    slurm.wait_for(lambda: (run_dir / "ckpt" / "latest").exists()
                   and rows_logged(run_dir) >= SAVE_INTERVAL + 5, 120,
                   f"job {job} to save and train on")
    slurm.run(["scancel", "--signal=USR1", "--full", job])


def attempts(log: str) -> list[str]:
    return re.findall(r"jrt-slurm: ==== .* attempt (\d+) .*", log)


def stop_step(log: str) -> int:
    # rank 0 names the signal, or "a peer rank's signal" when another rank got it first
    found = re.findall(r"jrt-train: stopped by (?:SIGUSR1|a peer rank's signal) after a "
                       r"checkpoint at step (\d+)", log)
    assert len(found) == 1, f"expected one checkpointed stop:\n{log}"
    return int(found[0])


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory):
    """An uninterrupted job: trains to the end, exits 0, is not requeued. Its loss rows."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    job = slurm.sbatch("slurm/train.sbatch", train_args(run_dir), options=TEST_NODE_OPTIONS)
    state = slurm.wait_end(job, run_dir / f"slurm-{job}.out")
    log = job_log(run_dir, job)
    expect_state(state, JobState="COMPLETED", Restarts="0", ExitCode="0:0", log=log)
    assert attempts(log) == ["1"], log
    assert "on 2 nodes x 1 tasks" in log and "TP=1 PP=1 DP=2" in log, log
    assert f"jrt-train: done at step {STEPS}" in log, log
    assert log.rstrip().endswith("the job ends (no requeue)"), log
    assert "scontrol requeue" not in log, log
    assert json.loads((run_dir / "exit.json").read_text())["code"] == 0
    rows = runs.loss_rows(run_dir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    return rows


# ---- tests ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.slurm
def test_a_preempted_job_checkpoints_requeues_itself_resumes_and_matches_an_uninterrupted_run(
        slurm, reference, tmp_path):
    run_dir = tmp_path / "run"
    job = slurm.sbatch("slurm/train.sbatch", train_args(run_dir, **{"logging.tensorboard": True}),
                       options=TEST_NODE_OPTIONS)
    stop_after_a_checkpoint(slurm, job, run_dir)
    state = slurm.wait_end(job, run_dir / f"slurm-{job}.out")
    log = job_log(run_dir, job)

    # Slurm: one requeue, then done.
    expect_state(state, JobState="COMPLETED", Restarts="1", ExitCode="0:0", log=log)
    # The job's own log: stop at step s with a checkpoint, requeue, resume at s, finish, stop.
    step = stop_step(log)
    assert SAVE_INTERVAL < step < STEPS, log
    assert attempts(log) == ["1", "2"], log
    assert "SIGUSR1 to the batch shell: forwarding it to the trainers" in log
    assert f"saved checkpoint {run_dir}/ckpt/step_{step:07d}" in log, log
    assert '"code": 10, "name": "STOPPED"' in log, log
    assert log.count(f"scontrol requeue {job}") == 1, log
    assert f"resumed from {run_dir}/ckpt/step_{step:07d} at step {step}" in log, log
    assert f"jrt-train: done at step {STEPS}" in log, log
    assert log.rstrip().endswith("the job ends (no requeue)"), log
    # The trainer's own records: both attempts in train.log, the last one in exit.json, one
    # TensorBoard directory with one event file per attempt, the final checkpoint.
    train_log = (run_dir / "train.log").read_text()
    assert train_log.count("==== jrt-train") == 2 and "resumed from" in train_log
    assert json.loads((run_dir / "exit.json").read_text())["code"] == 0
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert (run_dir / "ckpt" / "latest").read_text().strip() == f"step_{STEPS:07d}"
    # The losses: every step once, equal to the uninterrupted run's bit for bit.
    rows = runs.loss_rows(run_dir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert rows == reference


@pytest.mark.slow
@pytest.mark.slurm
def test_a_requeued_job_that_comes_back_on_one_node_resumes_with_the_new_layout(
        slurm, reference, tmp_path):
    run_dir = tmp_path / "run"
    # JRT_REQUEUE_HOLD=1: the script requeues the job held, so it can be changed first.
    job = slurm.sbatch("slurm/train.sbatch", train_args(run_dir), options=TEST_NODE_OPTIONS,
                       env={"JRT_REQUEUE_HOLD": "1"})
    stop_after_a_checkpoint(slurm, job, run_dir)
    slurm.wait_for(lambda: slurm.job(job).get("JobState") == "PENDING"
                   and "held" in slurm.job(job).get("Reason", "").lower(), 120,
                   f"job {job} to be requeued held")
    slurm.run(["scontrol", "update", f"JobId={job}", "NumNodes=1", "NumTasks=1", "NumCPUs=1"])
    slurm.run(["scontrol", "release", job])
    state = slurm.wait_end(job, run_dir / f"slurm-{job}.out")
    log = job_log(run_dir, job)

    expect_state(state, JobState="COMPLETED", Restarts="1", NumNodes="1", log=log)
    step = stop_step(log)
    assert f"scontrol requeuehold {job}" in log, log
    first, second = re.findall(r"jrt-slurm: ==== .*", log)
    assert "on 2 nodes x 1 tasks" in first and "DP=2" in first, log
    assert "on 1 nodes x 1 tasks" in second and "DP=1" in second, log
    assert f"resumed from {run_dir}/ckpt/step_{step:07d} at step {step}" in log, log
    assert f"jrt-train: done at step {STEPS}" in log, log
    assert log.rstrip().endswith("the job ends (no requeue)"), log
    rows = runs.loss_rows(run_dir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    # Up to the stop: the 2-node run's losses. After it one rank trains the same samples (mock
    # data is indexed by consumed samples), summed in another order: equal to rounding.
    assert rows[:step] == reference[:step]
    assert [row["loss"] for row in rows[step:]] == pytest.approx(
        [row["loss"] for row in reference[step:]], rel=1e-5)


@pytest.mark.slurm
def test_a_person_ends_a_run_with_a_checkpoint_and_no_requeue(slurm, tmp_path):
    # How a person stops a run for good, keeping its work: requeue off, then the stop signal
    # to the trainers only (as `--signal=USR1@N` at the time limit sends it; the batch shell
    # gets nothing and learns it from the exit code).
    run_dir = tmp_path / "run"
    job = slurm.sbatch("slurm/train.sbatch", train_args(run_dir), options=TEST_NODE_OPTIONS)
    slurm.wait_for(lambda: (run_dir / "ckpt" / "latest").exists()
                   and rows_logged(run_dir) >= SAVE_INTERVAL + 5, 120,
                   f"job {job} to save and train on")
    slurm.run(["scontrol", "update", f"JobId={job}", "Requeue=0"])
    slurm.run(["scancel", "--signal=USR1", job])
    state = slurm.wait_end(job, run_dir / f"slurm-{job}.out")
    log = job_log(run_dir, job)

    expect_state(state, JobState="FAILED", Restarts="0", ExitCode="10:0", log=log)
    step = stop_step(log)
    assert (run_dir / "ckpt" / "latest").read_text().strip() == f"step_{step:07d}"
    assert "to the batch shell" not in log, log
    assert "scontrol requeue" not in log, log
    assert log.rstrip().endswith(
        f"requeue is off for this job (sbatch --no-requeue, or scontrol update JobId={job} "
        "Requeue=0): the job ends here; sbatch again to continue"), log


@pytest.mark.slurm
def test_a_crashing_trainer_is_retried_at_most_n_times_then_the_job_stops(slurm, tmp_path):
    run_dir = tmp_path / "run"
    crash = tmp_path / "crash.sh"  # a trainer that fails at run time, every time (exit 1)
    crash.write_text('echo "crash.sh: restart ${SLURM_RESTART_COUNT:-0} rank $SLURM_PROCID"\n'
                     "exit 1\n")
    job = slurm.sbatch("slurm/train.sbatch", train_args(run_dir), options=TEST_NODE_OPTIONS,
                       env={"JRT_TRAIN": f"/bin/sh {crash}", "JRT_MAX_RETRIES": "2"})
    state = slurm.wait_end(job, run_dir / f"slurm-{job}.out")
    log = job_log(run_dir, job)

    # 1 + 2 retries, then the job fails with the trainer's code and says why.
    expect_state(state, JobState="FAILED", Restarts="2", ExitCode="1:0", log=log)
    assert attempts(log) == ["1", "2", "3"], log
    for restart in range(3):
        for rank in range(2):
            assert log.count(f"crash.sh: restart {restart} rank {rank}") == 1, log
    assert "crash 1 (exit 1); retry 1 of at most 2" in log, log
    assert "crash 2 (exit 1); retry 2 of at most 2" in log, log
    assert log.count(f"scontrol requeue {job}") == 2, log
    assert log.rstrip().endswith(
        f"crashed (exit 1) 3 times in a row without a new checkpoint; JRT_MAX_RETRIES=2: "
        f"not retried again (see {run_dir}/logs/ for the traceback)"), log
    assert (run_dir / "slurm-retries").read_text().split()[:2] == [job, "3"]


@pytest.mark.slurm
def test_config_and_data_errors_stop_the_job_without_a_retry(slurm, tmp_path):
    # A data error (exit 3): the tokenizer and shards do not exist. All ranks stop; rank 0's
    # exit.json gives the code; retrying could not help.
    run_dir = tmp_path / "data-error"
    job = slurm.sbatch("slurm/train.sbatch", train_args(
        run_dir, **{"data.mock_data": False, "data.data_dir": tmp_path / "no-shards",
                    "data.tokenizer": tmp_path / "no-tok.model"}),
        options=TEST_NODE_OPTIONS)
    state = slurm.wait_end(job, run_dir / f"slurm-{job}.out")
    log = job_log(run_dir, job)
    expect_state(state, JobState="FAILED", Restarts="0", ExitCode="3:0", log=log)
    assert '"code": 3, "name": "DATA"' in log and "no-tok.model" in log, log
    assert "scontrol requeue" not in log, log
    assert re.search(r"exit 3 = DATA: .*: not retried", log), log

    # A config error (exit 2) is found in the batch shell before srun: train_steps=0. The run
    # dir is not known yet, so the message is in sbatch's --output file.
    run_dir = tmp_path / "config-error"
    job = slurm.sbatch("slurm/train.sbatch", train_args(run_dir, **{"training.train_steps": 0}),
                       options=TEST_NODE_OPTIONS)
    state = slurm.wait_end(job)
    out = (slurm.root / f"sbatch-{job}.out").read_text()
    expect_state(state, JobState="FAILED", Restarts="0", ExitCode="2:0", log=out)
    assert "config error: training.train_steps" in out, out
    assert "not started, not retried" in out, out
    assert not run_dir.exists()


@pytest.mark.slurm
def test_prep_sbatch_writes_the_tokenizer_and_verified_shards(slurm, tmp_path):
    out = tmp_path / "data"
    job = slurm.sbatch("slurm/prep.sbatch", [str(out), "--bundled"],
                       options=["--cpus-per-task=2", "--time=30"],
                       env={"JRT_VOCAB_SIZE": "512",
                            "JRT_SHARDS_ARGS": "--shard-size 200k --valid-fraction 0.02"})
    state = slurm.wait_end(job)
    log = (slurm.root / f"sbatch-{job}.out").read_text()
    expect_state(state, JobState="COMPLETED", ExitCode="0:0", log=log)
    assert "(1 tokeniser workers)" in log, log  # --cpus-per-task 2 - 1
    assert (out / "tok.model").is_file()
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest, log
    assert f"done: --set data.data_dir={out}/shards --set data.tokenizer={out}/tok.model" in log


def test_the_slurm_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; .ci/run does)")
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "slurm").iterdir()
                     if p.suffix in (".sbatch", ".sh"))
    assert len(scripts) >= 5, scripts
    result = subprocess.run(["shellcheck", *scripts], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
