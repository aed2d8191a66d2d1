"""`python -m MODULE ARGS` for the tests, forked from a warm interpreter (tests/warm_server.py).

Each command the README documents starts Python and imports torch, Lightning and Hydra before it does anything:
about 3 s of CPU on this project's 2-core machine, for each of the 40 commands the quick suite runs. run() keeps
the command: its module runs as __main__ (runpy, as `python -m` runs it) with its arguments, environment and working
directory, and ends through the interpreter's own exit. Only the interpreter's start is shared: a server that
imported those libraries, and nothing of this project, forks once per command. What differs from a fresh process:
the libraries are imported already, and the commands share one hash seed. Tests about the process itself (signals,
what a command imports, commands running at once) and `make run`'s test use subprocess. FLOWSWEEP_TEST_WARM=0 runs
every command as a subprocess.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

#: Environment variables libraries read when imported (threads, devices, allocators, Python's own start): each set
#: of their values has a server of its own, started with them. PYTHONPATH is the child's own (sys.path);
#: Lightning's PL_ variables (PL_GLOBAL_SEED, which seed_everything sets in the tests' process) are read when used.
IMPORT_TIME = ("OMP_", "MKL_", "OPENBLAS_", "NUMEXPR_", "CUDA_", "PYTORCH_", "TORCH", "PYTHON", "MPLBACKEND", "LD_")

_lock = threading.Lock()
#: One server per set of import-time variables (their values as a command asks for them): {key: server}.
_servers: dict[tuple, subprocess.Popen] = {}


def run(args, *, cwd=None, env=None, timeout=None, capture_output=False, text=False, stdout=None, stderr=None,
        check=False, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run's signature and result; `[sys.executable, "-m", module, ...]` runs forked from the server."""
    env = dict(os.environ if env is None else env)
    if not _warm_enough(args, capture_output, stdout, stderr, kwargs):
        return subprocess.run(args, cwd=cwd, env=env, timeout=timeout, capture_output=capture_output, text=text,
                              stdout=stdout, stderr=stderr, check=check, **kwargs)
    with tempfile.TemporaryDirectory(prefix="warm-") as tmp, _lock:
        out, err = Path(tmp, "out"), Path(tmp, "err")
        together = stderr == subprocess.STDOUT
        code = _fork(_start(env), {"module": str(args[2]), "args": [str(a) for a in args[3:]],
                                   "cwd": str(Path(cwd or os.getcwd()).resolve()), "env": env, "out": str(out),
                                   "err": None if together else str(err)}, args, timeout, out, err)
        output, error = out.read_bytes(), (b"" if together else err.read_bytes())
    if stdout is not None and stdout != subprocess.PIPE:  # a file the caller opened: what the command wrote
        _write(stdout, output)
        output = None
    if stderr is not None and stderr not in (subprocess.PIPE, subprocess.STDOUT):
        _write(stderr, error)
        error = None
    if not capture_output and stdout is None:  # not captured: shown, as a subprocess's would be
        sys.stdout.write(output.decode(errors="replace"))
        output = None
    if not capture_output and stderr is None:
        sys.stderr.write(error.decode(errors="replace"))
        error = None
    if text:
        output = None if output is None else output.decode()
        error = None if error is None else error.decode()
    done = subprocess.CompletedProcess(list(args), code, output, error)
    if check:
        done.check_returncode()
    return done


def _warm_enough(args, capture_output, stdout, stderr, kwargs) -> bool:
    if os.environ.get("FLOWSWEEP_TEST_WARM", "1") == "0" or kwargs:
        return False
    if len(args) < 3 or str(args[0]) != sys.executable or args[1] != "-m":
        return False
    return not (capture_output and (stdout is not None or stderr is not None))


def _write(target, data: bytes) -> None:
    if hasattr(target, "buffer"):
        target.flush()
        target.buffer.write(data)
        target.buffer.flush()
    elif hasattr(target, "write"):
        target.write(data.decode(errors="replace") if "b" not in getattr(target, "mode", "b") else data)
        target.flush()
    else:  # a file descriptor
        os.write(target, data)


def _fork(server: subprocess.Popen, request: dict, args, timeout, out: Path, err: Path) -> int:
    # Unbuffered pipes (bufsize=0): nothing the server said is held in a buffer that select would not see.
    server.stdin.write((json.dumps(request) + "\n").encode())
    pid = json.loads(server.stdout.readline())["pid"]
    ready, _, _ = select.select([server.stdout], [], [], timeout)
    if not ready:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        json.loads(server.stdout.readline())
        raise subprocess.TimeoutExpired(list(args), timeout, out.read_bytes(),
                                        err.read_bytes() if err.exists() else b"")
    return json.loads(server.stdout.readline())["status"]


def _start(env: dict[str, str]) -> subprocess.Popen:
    """The server started with the command's import-time variables (the rest of its environment is the child's)."""
    key = tuple(sorted((k, v) for k, v in env.items() if k.startswith(IMPORT_TIME) and k != "PYTHONPATH"))
    server = _servers.get(key)
    if server is None or server.poll() is not None:
        own = {k: v for k, v in os.environ.items() if not k.startswith(IMPORT_TIME)} | dict(key)
        server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("warm_server.py"))],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=own,
                                  cwd=Path(__file__).resolve().parents[1])
        atexit.register(_stop, server)
        _servers[key] = server
    return server


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.stdin.close()  # end of input: the server ends
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
