"""A real one-node SLURM for the tests: ``munged``, ``slurmctld`` and ``slurmd`` started from a config of
their own in a temporary folder (Debian's ``slurm-wlm`` and ``munge``, Slurm 22.05).

:func:`one_node_slurm` installs the packages with ``apt-get`` when they are missing, writes ``slurm.conf``
(``select/cons_tres``, ``proctrack/linuxproc``, ``task/none``, no accounting, this machine as its one node
as ``slurmd -C`` describes it, one partition ``debug``) with its own munge key and socket, ports, pid, state,
spool and log files, starts the three daemons in the foreground as its own children and, on the way out,
cancels every job of its cluster and stops exactly those three processes. Where a machine cannot (not
root, no binaries and no ``apt-get``, an install or a daemon that fails), it raises :class:`Unavailable`
with the reason, which the fixture turns into a skip that says so.

Every client command (``sbatch``, ``squeue``, ``scontrol``, ``scancel``) finds the cluster through
``SLURM_CONF`` in :attr:`Slurm.env`; a job exports that environment, so the ``sbatch`` that
dask-jobqueue calls inside a driver job submits to the same cluster.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ["munged", "slurmctld", "slurmd"]
PARTITION = "debug"


class Unavailable(RuntimeError):
    """This machine cannot run a one-node SLURM; the message says why."""


def _sbin(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)),
                                      None)


def ensure_installed() -> None:
    """``apt-get install -y slurm-wlm munge`` when a daemon or ``sbatch`` is missing (``apt-get update``
    first only when the package lists do not know them)."""
    if all(_sbin(d) for d in [*DAEMONS, "sbatch", "mungekey"]):
        return
    if os.geteuid() != 0:
        raise Unavailable("slurm-wlm/munge are not installed and installing them needs root")
    if not shutil.which("apt-get"):
        raise Unavailable("slurm-wlm/munge are not installed and there is no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", *PACKAGES]
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip()[-500:]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_line(name: str) -> str:
    """This machine as a ``NodeName=`` line: ``slurmd -C``'s CPUs/boards/sockets/cores/threads/memory."""
    done = subprocess.run([_sbin("slurmd") or "slurmd", "-C"], capture_output=True, text=True)
    words = done.stdout.split("\n")[0].split() if done.returncode == 0 else []
    if not words or not words[0].startswith("NodeName="):
        raise Unavailable(f"slurmd -C did not describe this machine: {done.stderr.strip()[-300:]}")
    return " ".join([f"NodeName={name}", "NodeAddr=127.0.0.1", *words[1:], "State=UNKNOWN"])


def write_config(folder: Path) -> Path:
    """``folder/slurm.conf`` (and its munge key, state and spool folders); returns the config path."""
    for sub in ("state", "spool", "log", "munge"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "munge").chmod(0o700)
    host = socket.gethostname().split(".")[0]
    lines = [
        "ClusterName=stegopipe-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"AuthInfo=socket={folder / 'munge' / 'munge.socket'},cred_expire=10",  # a requeued job waits cred_expire
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'log' / 'slurmd.log'}",
        f"PlugStackConfig={folder / 'plugstack.conf'}",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "SchedulerParameters=sched_interval=2",
        "MinJobAge=5",
        "KillWait=10",
        "InactiveLimit=0",
        node_line(host),
        f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]
    (folder / "plugstack.conf").write_text("")
    conf = folder / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


@dataclass
class Slurm:
    """A running one-node cluster: its folder, config and the environment its clients need."""

    dir: Path
    conf: Path
    env: dict[str, str]
    daemons: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def run(self, *args: str, check: bool = True, cwd: Path | None = None) -> str:
        """A SLURM client command against this cluster; its stdout."""
        done = subprocess.run(list(args), env=self.env, cwd=cwd, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}\n{self.logs()}")
        return done.stdout

    def jobs(self) -> list[dict[str, str]]:
        """The cluster's queue: id, name, state and reason of every job ``squeue`` lists."""
        out = self.run("squeue", "--noheader", "--format=%i|%j|%T|%r")
        return [dict(zip(("id", "name", "state", "reason"), line.split("|"))) for line in out.splitlines() if line]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job ID`` as a dict (empty once the controller has forgotten the job)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id, check=False)
        return dict(word.split("=", 1) for word in out.split() if "=" in word)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted((self.dir / "log").glob("*.log")))

    def wait_idle(self, timeout_s: float = 90) -> None:
        """Cancel every job of this cluster and wait until ``squeue`` lists none."""
        deadline = time.monotonic() + timeout_s
        while self.jobs():
            if time.monotonic() > deadline:
                raise RuntimeError(f"jobs left after {timeout_s} s: {self.jobs()}")
            self.run("scancel", "--full", *(j["id"] for j in self.jobs()), check=False)
            time.sleep(1)


def _start(slurm: Slurm, name: str, args: list[str]) -> None:
    with open(slurm.dir / "log" / f"{name}.out", "wb") as out:
        slurm.daemons[name] = subprocess.Popen(args, env=slurm.env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True)


def _wait(what: str, ready: callable, slurm: Slurm, timeout_s: float = 60) -> None:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout_s
    while not ready():
        dead = [n for n, p in slurm.daemons.items() if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise Unavailable(f"{what} did not come up ({', '.join(dead) or 'timeout'} exited):\n{slurm.logs()}")
        time.sleep(0.3)


def _stop(slurm: Slurm) -> None:
    """SIGTERM to each daemon this module started (slurmd, slurmctld, munged), SIGKILL after 20 s."""
    for name in reversed(list(slurm.daemons)):
        proc = slurm.daemons[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def one_node_slurm(folder: Path) -> Iterator[Slurm]:
    """Start a one-node SLURM in ``folder``; on exit cancel its jobs and stop the daemons it started."""
    if os.geteuid() != 0:
        raise Unavailable("a one-node SLURM needs root (slurmd and munged run as root here)")
    ensure_installed()
    conf = write_config(folder)
    munge = folder / "munge"
    key = munge / "munge.key"
    subprocess.run([_sbin("mungekey") or "mungekey", "--create", f"--keyfile={key}"], check=True,
                   capture_output=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(conf)
    slurm = Slurm(folder, conf, env)
    try:
        _start(slurm, "munged", [_sbin("munged") or "munged", "--foreground", "--force", f"--key-file={key}",
                                 f"--socket={munge / 'munge.socket'}", f"--pid-file={munge / 'munged.pid'}",
                                 f"--log-file={folder / 'log' / 'munged.log'}",
                                 f"--seed-file={munge / 'munged.seed'}"])
        _wait("munged", (munge / "munge.socket").exists, slurm)
        _start(slurm, "slurmctld", [_sbin("slurmctld") or "slurmctld", "-D", "-i", "-f", str(conf)])
        _wait("slurmctld", lambda: subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True
                                                  ).stdout.count("is UP") > 0, slurm)
        _start(slurm, "slurmd", [_sbin("slurmd") or "slurmd", "-D", "-f", str(conf)])
        _wait("slurmd", lambda: "idle" in slurm.run("sinfo", "--noheader", "--format=%t", check=False), slurm)
        yield slurm
    finally:
        with contextlib.suppress(Exception):
            if "slurmd" in slurm.daemons:
                slurm.wait_idle()
        _stop(slurm)
