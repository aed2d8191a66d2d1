"""The server of tests/warm.py: imports the heavy libraries once, then forks one child per command.

Protocol, one JSON line each way per command: the client sends {"module", "args", "cwd", "env", "out", "err"}; the
server answers {"pid"} as soon as the child exists and {"status"} (its exit status, as subprocess reports it) once
it ended. End of input ends the server. Nothing of this project is imported here: each child imports it afresh.
"""

import importlib
import json
import os
import runpy
import sys
import types

# What every command of this project imports (Lightning brings torchmetrics, torchvision and scipy): about 5 s of
# each command's start on this kind of machine. Importing starts no threads and reads no project state.
for _name in ("hydra", "lightning.pytorch", "omegaconf", "pandas", "torch"):
    importlib.import_module(_name)

#: sys.path as a fresh interpreter builds it, without the entries of this server's own start (its directory,
#: its PYTHONPATH): a child puts its own in front, as `python -m` would.
_OWN = {os.path.dirname(os.path.abspath(__file__)), *os.environ.get("PYTHONPATH", "").split(os.pathsep)} - {""}
BASE_PATH = [p for p in sys.path[1:] if p not in _OWN]


def child(request: dict) -> None:
    """In the forked child: become `python -m module args` run in cwd with env, writing to the two files."""
    os.setpgrp()  # a time-out kills the command and whatever it started
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    # err None: into the same file, as subprocess's stderr=STDOUT
    os.dup2(out if request["err"] is None else os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
            2)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.getcwd(), *extra, *BASE_PATH]
    sys.argv = ["-m", *request["args"]]
    sys.modules["__main__"] = types.ModuleType("__main__")  # a fresh one, not this server's
    try:
        runpy._run_module_as_main(request["module"], alter_argv=True)  # what `python -m` calls
    except SystemExit:
        raise
    except BaseException as e:  # as the interpreter says an uncaught exception (from runpy's frame on), exit status 1
        import traceback

        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        sys.exit(1)
    # The interpreter's own exit from here (SystemExit through serve): threads joined, exit handlers run, objects
    # finalised and output flushed, as at the end of `python -m`.
    sys.exit(0)


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
