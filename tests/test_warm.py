"""tests/warm.py runs `python -m MODULE` forked from a warm interpreter: what the command sees (arguments, working
directory, environment, a fresh __main__), what it gives back (exit status, output, an uncaught exception) and a
time-out are those of a subprocess."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests import warm

PROBE = textwrap.dedent('''
    import json, os, sys
    import atexit
    atexit.register(lambda: print("exit handler ran", file=sys.stderr))
    if sys.argv[1] == "raise":
        raise RuntimeError("boom")
    if sys.argv[1] == "sleep":
        import time
        time.sleep(60)
    print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": os.environ.get("PROBE_VALUE"),
                      "main": sorted(k for k in vars(sys.modules["__main__"]) if not k.startswith("__")),
                      "name": __name__, "path0": sys.path[0]}))
    print("to stderr", file=sys.stderr)
    sys.exit(int(sys.argv[2]))
''')


@pytest.fixture
def probe(tmp_path):
    (tmp_path / "probe_mod.py").write_text(PROBE)
    return tmp_path


def test_a_forked_command_is_what_a_subprocess_is(probe):
    def both(*args, **kwargs):
        command = [sys.executable, "-m", "probe_mod", *args]
        forked, fresh = (runner(command, cwd=probe, capture_output=True, text=True, timeout=120, **kwargs)
                         for runner in (warm.run, subprocess.run))
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
        return forked

    done = both("a b", "3", env={**os.environ, "PROBE_VALUE": "42"})
    seen = json.loads(done.stdout)
    main = [k for k in seen["main"] if k not in ("atexit", "json", "os", "sys")]  # a fresh __main__: only its own
    assert (done.returncode, seen["argv"], seen["cwd"], seen["env"], seen["name"], seen["path0"], main) == (
        3, ["a b", "3"], str(probe), "42", "__main__", str(probe), [])
    assert done.stderr == "to stderr\nexit handler ran\n"
    raised = both("raise")  # the same traceback, from runpy's frames on, and exit status
    assert raised.returncode == 1 and "RuntimeError: boom\nexit handler ran\n" in raised.stderr


def test_a_command_past_its_time_out_is_killed(probe):
    with pytest.raises(subprocess.TimeoutExpired):
        warm.run([sys.executable, "-m", "probe_mod", "sleep"], cwd=probe, capture_output=True, timeout=3)
    done = warm.run([sys.executable, "-m", "probe_mod", "x", "0"], cwd=probe, capture_output=True, text=True,
                    timeout=120)  # the server goes on
    assert done.returncode == 0


def test_output_into_a_file_and_stderr_with_it(probe, tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        done = warm.run([sys.executable, "-m", "probe_mod", "x", "0"], cwd=probe, stdout=f, stderr=subprocess.STDOUT,
                        timeout=120)
    assert done.returncode == 0 and done.stdout is None
    text = log.read_text()
    assert '"argv": ["x", "0"]' in text and "to stderr" in text and "exit handler ran" in text
