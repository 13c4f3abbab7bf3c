"""The sandboxed python tool: output, the REPL-style last value, errors, the time / CPU / memory / file-size
limits, truncation, no network (in every blocking mode this machine has), no inherited environment, and a
scratch directory that is gone after the call."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from qwen35.agent import PythonTool
from qwen35.agent.python_tool import network_namespace_command

MODES = ["prelude"] + (["namespace"] if network_namespace_command() else [])


@pytest.fixture(scope="module")
def python_tool():
    return PythonTool(timeout=20, cpu_seconds=10)


def test_definition(python_tool):
    definition = python_tool.definition["function"]
    assert definition["name"] == "python"
    assert definition["parameters"]["required"] == ["code"]
    assert python_tool.network_block == ("namespace" if network_namespace_command() else "prelude")


def test_output_and_the_last_expression(python_tool):
    assert python_tool.run({"code": "print('hello')\nx = 6\nx * 7"}) == "hello\n42"
    assert python_tool.run({"code": "x = 1"}) == "(no output)"
    assert python_tool.run({"code": "None"}) == "(no output)"  # like the REPL: None is not shown


def test_errors_show_only_the_users_frames(python_tool):
    out = python_tool.run({"code": "def f():\n    return 1 / 0\nprint('before')\nf()"})
    assert out.startswith("before\n[stderr]\nTraceback (most recent call last):")
    assert 'File "<code>", line 2, in f' in out and "return 1 / 0" in out  # source lines are shown
    assert "ZeroDivisionError: division by zero" in out and out.endswith("[exit status 1]")
    assert "<string>" not in out  # the prelude's frames are left out
    out = python_tool.run({"code": "if x"})
    assert "SyntaxError" in out and out.endswith("[exit status 1]")
    assert python_tool.run({"code": "import sys; sys.exit(3)"}) == "[exit status 3]"
    with pytest.raises(ValueError, match="'code' argument must be a string"):
        python_tool.run({"code": 5})


def test_wall_clock_timeout():
    tool = PythonTool(timeout=1, cpu_seconds=30)
    start = time.monotonic()
    out = tool.run({"code": "import time\nprint('started', flush=True)\ntime.sleep(60)"})
    assert time.monotonic() - start < 10
    assert out == "started\n[killed: the time limit of 1 s was reached]"


def test_cpu_limit():
    out = PythonTool(timeout=30, cpu_seconds=1).run({"code": "while True:\n    pass"})
    assert out == "[killed: the CPU time limit of 1 s was reached]"


def test_memory_limit():
    tool = PythonTool(memory=256 << 20)
    assert tool.run({"code": "len(bytearray(64 << 20))"}) == str(64 << 20)  # below the limit: fine
    out = tool.run({"code": "x = bytearray(512 << 20)"})
    assert "MemoryError" in out and out.endswith("[exit status 1]")


def test_file_size_limit_and_output_truncation():
    tool = PythonTool(file_size=1 << 20, max_output=200)
    out = tool.run({"code": "open('big', 'wb').write(b'x' * (2 << 20))"})
    assert "File too large" in out
    out = tool.run({"code": "print('y' * 5000)"})
    assert out.startswith("y" * 200 + "\n[... output truncated: 5001 bytes in all")
    assert len(out) < 300


def test_limits_are_set_inside(python_tool):
    out = python_tool.run({"code": "import resource\n"
                                   "[resource.getrlimit(getattr(resource, n)) for n in "
                                   "('RLIMIT_CPU', 'RLIMIT_AS', 'RLIMIT_FSIZE', 'RLIMIT_NPROC', 'RLIMIT_CORE')]"})
    assert out == str([(10, 10), (1 << 30, 1 << 30), (64 << 20, 64 << 20), (0, 0), (0, 0)])
    if os.geteuid() != 0:  # Linux exempts root from RLIMIT_NPROC; everyone else cannot start a process
        out = python_tool.run({"code": "import os\nos.fork()"})
        assert "BlockingIOError" in out or "Resource temporarily unavailable" in out


def test_no_background_process_outlives_the_call(tmp_path):
    marker = tmp_path / "still-running"
    child = f"import time; time.sleep(0.8); open({str(marker)!r}, 'w')"
    code = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\nprint('started')"
    assert PythonTool(processes=True).run({"code": code}) == "started"
    time.sleep(1.5)
    assert not marker.exists()


@pytest.fixture
def listener():
    """A TCP server on this machine's loopback that accepts connections; yields its port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                server.accept()[0].close()
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


@pytest.mark.parametrize("mode", MODES)
def test_no_network(mode, listener):
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {listener}), timeout=2)\nprint('connected')"
    # the same code outside the sandbox does connect: the listener is real
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert plain.stdout.strip() == "connected"
    tool = PythonTool(network_block=mode)
    assert tool.network_block == mode
    out = tool.run({"code": code})
    assert "connected" not in out.split("[stderr]")[0]
    expected = "network access is disabled in this sandbox" if mode == "prelude" else "Network is unreachable"
    assert expected in out and out.endswith("[exit status 1]")
    out = tool.run({"code": "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)"})
    assert "URLError" in out or "PermissionError" in out or "unreachable" in out.lower()


def test_no_caller_environment(python_tool, monkeypatch):
    monkeypatch.setenv("QWEN35_SECRET_TOKEN", "hunter2")
    out = python_tool.run({"code": "import os\nprint(sorted(os.environ))\nprint(os.environ['HOME'] == os.getcwd())"})
    names, same_home = out.splitlines()
    assert "QWEN35_SECRET_TOKEN" not in names and "hunter2" not in out
    assert eval(names) == ["HOME", "LANG", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TMPDIR"]
    assert same_home == "True"


def test_scratch_directory_is_fresh_and_removed(python_tool):
    out = python_tool.run({"code": "import os\nopen('notes.txt', 'w').write('x')\nos.mkdir('sub')\n"
                                   "os.chmod('sub', 0o500)\nprint(os.getcwd())\nsorted(os.listdir('.'))"})
    scratch, listing = out.splitlines()
    assert listing == "['notes.txt', 'sub']"
    assert not os.path.exists(scratch) and not os.path.exists(os.path.dirname(scratch))
    assert python_tool.run({"code": "import os\nos.listdir('.')"}) == "[]"


def test_bad_settings():
    with pytest.raises(ValueError, match="network_block must be"):
        PythonTool(network_block="none")
    with pytest.raises(ValueError, match="memory >= 32 MiB"):
        PythonTool(memory=1000)
