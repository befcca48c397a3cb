"""`tuneforge run ... --nproc N`: start N data-parallel processes on this machine through torchrun, each running
the same command without the launch flags. Imports no torch: the launcher only waits.

    tuneforge run examples/sentiment.yaml --nproc 2
    tuneforge run cfg.yaml --nproc 8 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500

Every process runs the pipeline; rank 0 alone reads and audits the data, talks and writes (pipeline.run). Each
process records its exit code in a folder the launcher gives it (TUNEFORGE_LAUNCH_DIR), so the launcher exits with
the code the pipeline meant (2 bad input, 3 audit blocked, 130 interrupted), not torchrun's 1, and a user error
ends without torchrun's failure report.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tuneforge.errors import ConfigError

LAUNCH_DIR_ENV = "TUNEFORGE_LAUNCH_DIR"
# flag -> argparse dest; each takes a value, and is stripped from the command each process runs
LAUNCH_FLAGS = {"--nproc": "nproc", "--nnodes": "nnodes", "--node-rank": "node_rank", "--master-addr": "master_addr",
                "--master-port": "master_port"}
DEFAULT_MASTER_PORT = 29500  # torchrun's, for several machines (one machine takes a free port)


def add_launch_arguments(p) -> None:
    """The scale-out flags of `run` (and `tune`)."""
    p.add_argument("--nproc", type=int, help="data-parallel processes on this machine, started through torchrun "
                   "(one per GPU; on CPU, each gets cores/N threads). The global batch stays train.batch_size")
    p.add_argument("--nnodes", type=int, default=1, help="machines taking part (default 1); run the same command on each")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0 to nnodes-1 (0 = the one at --master-addr)")
    p.add_argument("--master-addr", help="address of machine 0 (needed with --nnodes > 1; default 127.0.0.1)")
    p.add_argument("--master-port", type=int, help=f"port on machine 0 (default: a free one on one machine, "
                   f"{DEFAULT_MASTER_PORT} on several)")


def wants_launch(args) -> bool:
    """True when this command should start the processes; False inside one of them (torchrun set LOCAL_RANK)."""
    if "LOCAL_RANK" in os.environ:
        return False
    if getattr(args, "nproc", None) is None:
        defaults = {"nnodes": 1, "node_rank": 0}
        given = [f for f, dest in LAUNCH_FLAGS.items()
                 if dest != "nproc" and getattr(args, dest, None) != defaults.get(dest)]
        if given:
            raise ConfigError(f"{', '.join(given)} without --nproc", fix="pass --nproc N: the processes to start on this machine")
        return False
    return True


def child_argv(argv: list[str]) -> list[str]:
    """The command line without the launch flags (`--nproc 2` and `--nproc=2` forms)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = "=" not in token
            continue
        out.append(token)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def torchrun_command(args, argv: list[str]) -> tuple[list[str], str]:
    """(the torchrun command line, where the processes meet) for the parsed launch flags and the original argv."""
    if args.nproc < 1:
        raise ConfigError(f"--nproc is {args.nproc}: it must be at least 1", fix="pass --nproc N with N >= 1")
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise ConfigError(f"--node-rank {args.node_rank} is not between 0 and --nnodes {args.nnodes} - 1",
                          fix="number the machines 0 .. nnodes-1; machine 0 is the one at --master-addr")
    if args.nnodes > 1 and not args.master_addr:
        raise ConfigError(f"--nnodes {args.nnodes} needs --master-addr: the address of machine 0, which every machine can reach",
                          fix="pass --master-addr HOST (under Slurm: $(scontrol show hostnames | head -1))")
    addr = args.master_addr or "127.0.0.1"
    port = args.master_port or (DEFAULT_MASTER_PORT if args.nnodes > 1 else free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc)]
    cmd += ["--nnodes", str(args.nnodes), "--node_rank", str(args.node_rank), "--master_addr", addr, "--master_port", str(port)]
    return cmd + ["-m", "tuneforge", *child_argv(argv)], f"{addr}:{port}"


def threads_per_process(nproc: int) -> tuple[str, str]:
    """(OMP_NUM_THREADS for each process, why): the environment's if set, else this machine's cores / N."""
    if os.environ.get("OMP_NUM_THREADS"):
        return os.environ["OMP_NUM_THREADS"], "from the environment"
    cores = usable_cores()
    return str(max(1, cores // nproc)), f"{cores} cores / {nproc} processes"


def launch(args, argv: list[str]) -> int:
    """Run the command in `args.nproc` processes under torchrun; the exit code is the processes' (rank 0's first).

    Ctrl-C (or SIGTERM, as Slurm and Kubernetes send) is passed to every process once: training stops at the next
    step boundary, all processes agreeing, rank 0 saves a checkpoint and the command exits 130 (`--resume` goes on).
    A second Ctrl-C kills the processes at once."""
    cmd, where = torchrun_command(args, argv)
    threads, why = threads_per_process(args.nproc)
    launch_dir = Path(tempfile.mkdtemp(prefix="tuneforge-launch-"))
    env = {**os.environ, "OMP_NUM_THREADS": threads, LAUNCH_DIR_ENV: str(launch_dir)}
    machines = f" on machine {args.node_rank} of {args.nnodes}" if args.nnodes > 1 else " on this machine"
    print(f"launch: {args.nproc} processes{machines} through torchrun, rendezvous {where}; "
          f"OMP_NUM_THREADS={threads} each ({why})", file=sys.stderr, flush=True)
    # torchrun in a session of its own: a Ctrl-C in the terminal reaches only this launcher, which passes it on to
    # the processes once (torchrun itself would answer with SIGTERM-then-kill and a failure report)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    interrupts = []

    def on_signal(signum, frame):
        interrupts.append(signum)
        if len(interrupts) == 1:
            print("\nstopping the processes (in training: after the current step, rank 0 saving a checkpoint); "
                  "Ctrl-C again kills them now", file=sys.stderr, flush=True)
            if not _signal_processes(launch_dir, signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM):
                _kill_session(proc, signal.SIGTERM)  # none started yet: torchrun stops them as they come
        else:
            _signal_processes(launch_dir, signal.SIGKILL)
            _kill_session(proc, signal.SIGKILL)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = _exit_codes(launch_dir)
    _remove(launch_dir)
    return _exit_code(rc, codes, killed=len(interrupts) > 1)


def _signal_processes(launch_dir: Path, sig) -> int:
    """Signal every process that has started; how many were found."""
    found = 0
    for path in launch_dir.glob("pid.*"):
        found += 1
        try:
            os.kill(int(path.read_text()), sig)
        except (OSError, ValueError):
            pass  # already gone
    return found


def _kill_session(proc: subprocess.Popen, sig) -> None:
    try:
        os.killpg(proc.pid, sig)
    except OSError:
        pass


def _exit_codes(launch_dir: Path) -> dict[int, dict]:
    codes = {}
    for path in launch_dir.glob("exit.*"):
        try:
            codes[int(path.suffix[1:])] = json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    return codes


def _exit_code(torchrun_rc: int, codes: dict[int, dict], killed: bool) -> int:
    if killed:
        return 130
    if codes.get(0, {}).get("code"):
        return codes[0]["code"]  # rank 0 printed its message
    for rank in sorted(codes):
        if codes[rank]["code"]:  # an error of another rank's own: its message, once
            print(f"rank {rank}: error: {codes[rank].get('message', '')}", file=sys.stderr)
            if codes[rank].get("fix"):
                print(f"fix: {codes[rank]['fix']}", file=sys.stderr)
            return codes[rank]["code"]
    return torchrun_rc  # a crash (torchrun's report above names the rank), or 0


def _remove(launch_dir: Path) -> None:
    import shutil

    shutil.rmtree(launch_dir, ignore_errors=True)


def record_start() -> list:
    """In a launched process: leave the pid, so the launcher can pass Ctrl-C on, and make SIGINT / SIGTERM raise
    KeyboardInterrupt as by default, remembered in the list returned: an error that follows one (another process's
    closed connection) is part of the interruption, not a crash."""
    seen: list = []
    d = os.environ.get(LAUNCH_DIR_ENV)
    if d and "RANK" in os.environ:
        def interrupted(signum, frame):
            seen.append(signum)
            raise KeyboardInterrupt

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, interrupted)
        Path(d, f"pid.{os.environ['RANK']}").write_text(str(os.getpid()))
    return seen


def record_exit(code: int, message: str = "", fix: str | None = None) -> int:
    """In a launched process: leave the exit code for the launcher; returns the code the process should exit with.

    An error the pipeline raised on purpose (bad input, blocked audit, an agreed interruption) ends every process
    alike: they exit 0 and the launcher exits with the recorded code, so torchrun prints no failure report. A crash
    keeps its code, so torchrun stops the other processes."""
    d = os.environ.get(LAUNCH_DIR_ENV)
    if not d or "RANK" not in os.environ:
        return code
    tmp = Path(d, f"exit.{os.environ['RANK']}.tmp")
    tmp.write_text(json.dumps({"code": code, "message": message, "fix": fix, "time": time.time()}))
    os.replace(tmp, Path(d, f"exit.{os.environ['RANK']}"))
    return 0


def close_process_group(code: int) -> int:
    """At a planned end (done, a shared error, an agreed interruption): wait for the other processes, then close the
    process group; returns `code`. Left to interpreter exit, the group's threads can be torn down while still
    running (`terminate called without an active exception`, SIGABRT), and torchrun reports a crash for an exit the
    pipeline meant. A crash does not come here: its process group dies with it and torchrun stops the others."""
    if "torch.distributed" not in sys.modules:
        return code
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return code
    try:
        dist.barrier()  # every process has sent and received all it will: none closes a connection still in use
    except Exception:  # noqa: BLE001 - another process already gone: nothing left to wait for
        pass
    dist.destroy_process_group()
    return code
