"""A ``python`` tool: runs model-written code in a fresh, limited interpreter.

Every call starts a new ``python -I -X utf8`` process (isolated mode: no PYTHON* variables, no user site, the
current directory not on sys.path) and throws it away afterwards.  The process gets:

* **a scratch directory** as its working directory, HOME and TMPDIR: a new temporary folder per call, deleted
  with everything in it when the call ends (nothing carries over from one call to the next);
* **an empty environment**: none of the caller's variables (API keys, tokens) -- only HOME/TMPDIR pointing at the
  scratch folder, LANG=C.UTF-8 and thread counts of 1 for OpenMP/BLAS;
* **resource limits** (``resource.setrlimit``, set by a prelude before the code runs, soft = hard so the code
  cannot raise them): CPU seconds (RLIMIT_CPU: killed when spent), address space (RLIMIT_AS: allocations beyond it
  raise MemoryError), size of any file written (RLIMIT_FSIZE), no core dumps, and -- unless ``processes=True`` --
  RLIMIT_NPROC = 0, so it cannot start processes or threads at all (no fork bombs).  Linux does not apply
  RLIMIT_NPROC to root; there the wall-clock limit and the process-group kill below are what bound them;
* **a wall-clock timeout**: past it the whole process group is killed (SIGKILL), as it also is after every
  normal exit, so that no background process outlives the call;
* **no network**, in one of two ways (``PythonTool.network_block`` says which one is in use):

  - ``"namespace"`` (Linux, preferred): the process starts under ``unshare --net`` (with ``--map-root-user``
    when the kernel lets unprivileged users make namespaces, else plain ``unshare --net`` where the caller may,
    i.e. root): it lives in a new network namespace with only a loopback device that is down, so every
    connection fails with "Network is unreachable", whatever library or syscall makes it.  Used when a trial run
    of ``unshare`` works (probed once per process);
  - ``"prelude"`` (anywhere else): the prelude replaces ``socket.socket`` (and ``_socket.socket``,
    ``socket.create_connection``, ``getaddrinfo`` and the other resolvers) with versions that raise
    PermissionError, leaving only AF_UNIX sockets.  That stops ordinary Python code, ``urllib``, ``requests``
    and friends; it is not a wall against code determined to get out (``ctypes`` can make raw syscalls).

stdout and stderr go to files (bounded by the file-size limit too, so a flood of output cannot fill memory)
and come back truncated to ``max_output`` characters each.  Like an interactive session, the value of a final
expression statement is printed (``2 ** 10`` alone shows ``1024``).  What this is not: a filesystem jail --
the code can read whatever the user running qwen35 can read; run the chat under an account or container that
holds nothing you would not show the model.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from .tools import Tool

__all__ = ["PythonTool", "network_namespace_command"]

_KiB, _MiB = 1 << 10, 1 << 20

DESCRIPTION = ("Run Python 3 code in a sandbox: a fresh process each call, an empty scratch directory, no network, "
               "limited CPU time and memory. Print what you need to see; the value of a final expression is "
               "printed too. Returns stdout, then stderr and the exit status if the code failed.")

PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"code": {"type": "string", "description": "The Python code to run, e.g. print(2 ** 100)."}},
    "required": ["code"],
}

# Runs in the child before the user's code (python -I -c PRELUDE CODE_FILE CPU MEM FSIZE NPROC BLOCK): set the
# limits, block sockets when asked, then run the code REPL-style, with tracebacks that show only the user's frames.
PRELUDE = r'''
import sys, resource
_cpu, _mem, _fsize, _nproc, _block = (int(x) for x in sys.argv[2:7])
def _limit(kind, value):
    if value >= 0:
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            pass
_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_CPU, _cpu)
_limit(resource.RLIMIT_FSIZE, _fsize)
if hasattr(resource, "RLIMIT_NPROC"):
    _limit(resource.RLIMIT_NPROC, _nproc)
import ast, errno, linecache, traceback
if _block:
    import socket, _socket
    def _refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "network access is disabled in this sandbox")
    class _LocalOnlySocket(socket.socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if family != socket.AF_UNIX:
                _refuse()
            super().__init__(family, type, proto, fileno)
    socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = _LocalOnlySocket
    for _name in ("create_connection", "create_server", "fromfd", "getaddrinfo", "gethostbyname",
                  "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        for _module in (socket, _socket):
            if hasattr(_module, _name):
                setattr(_module, _name, _refuse)
with open(sys.argv[1], encoding="utf-8") as _f:
    _source = _f.read()
sys.argv = ["<code>"]
_limit(resource.RLIMIT_AS, _mem)  # last: the prelude's own imports are done
linecache.cache["<code>"] = (len(_source), None, _source.splitlines(True), "<code>")
def _user_frames(tb):
    while tb is not None and tb.tb_frame.f_code.co_filename != "<code>":
        tb = tb.tb_next
    return tb
try:
    _tree = ast.parse(_source, "<code>")
except (SyntaxError, ValueError) as _e:
    sys.stderr.write("".join(traceback.format_exception_only(type(_e), _e)))
    sys.exit(1)
_last = _tree.body.pop() if _tree.body and isinstance(_tree.body[-1], ast.Expr) else None
_globals = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(_tree, "<code>", "exec"), _globals)
    if _last is not None:
        _value = eval(compile(ast.Expression(_last.value), "<code>", "eval"), _globals)
        if _value is not None:
            print(repr(_value))
except SystemExit:
    raise
except BaseException as _e:
    sys.stdout.flush()
    traceback.print_exception(type(_e), _e, _user_frames(_e.__traceback__))
    sys.exit(1)
'''

_probed: dict[str, list[str] | None] = {}


def network_namespace_command() -> list[str] | None:
    """The ``unshare`` prefix that puts a process in a new, empty network namespace here, or None when there is
    none (not Linux, no unshare, namespaces not allowed).  Probed once: a trial run must succeed."""
    if "prefix" in _probed:
        return _probed["prefix"]
    found = None
    unshare = shutil.which("unshare") if sys.platform.startswith("linux") else None
    if unshare:
        for prefix in ([unshare, "--net", "--map-root-user"], [unshare, "--net"]):
            try:
                probe = subprocess.run([*prefix, sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
            except (OSError, subprocess.SubprocessError):
                continue
            if probe.returncode == 0:
                found = prefix
                break
    _probed["prefix"] = found
    return found


def _read_capped(path: str, limit: int) -> str:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read(limit * 4 + 4)  # at most 4 bytes a character
    text = data.decode("utf-8", errors="replace")
    if len(text) > limit or size > len(data):
        text = text[:limit] + f"\n[... output truncated: {size} bytes in all, the first {limit} characters shown]"
    return text


def _rmtree(path: str) -> None:
    def retry(function, target, _exc):
        # code may have left read-only files or folders behind; give write access back and try again
        try:
            os.chmod(os.path.dirname(target), 0o700)
            os.chmod(target, 0o700)
            function(target)
        except OSError:
            pass

    shutil.rmtree(path, onerror=retry)


class PythonTool(Tool):
    """The sandboxed ``python`` tool (see the module docstring for what the sandbox does and does not do).

    ``timeout``: wall-clock seconds per call; ``cpu_seconds``; ``memory``: bytes of address space;
    ``file_size``: bytes per file written (stdout and stderr included); ``max_output``: characters of stdout
    and of stderr given back; ``processes``: allow the code to start processes and threads;
    ``network_block``: "auto" (a network namespace if available, else the prelude), "namespace" or "prelude".
    """

    def __init__(self, *, timeout: float = 30.0, cpu_seconds: int = 20, memory: int = 1 << 30,
                 file_size: int = 64 * _MiB, max_output: int = 8000, processes: bool = False,
                 network_block: str = "auto", name: str = "python") -> None:
        if not (timeout > 0 and cpu_seconds >= 1 and memory >= 32 * _MiB and file_size >= _KiB and max_output >= 100):
            raise ValueError("PythonTool limits: timeout > 0, cpu_seconds >= 1, memory >= 32 MiB, "
                             "file_size >= 1 KiB, max_output >= 100 characters")
        if network_block not in ("auto", "namespace", "prelude"):
            raise ValueError(f"network_block must be 'auto', 'namespace' or 'prelude', got {network_block!r}")
        prefix = network_namespace_command() if network_block != "prelude" else None
        if network_block == "namespace" and prefix is None:
            raise ValueError("network_block='namespace' needs Linux with a working 'unshare --net'; "
                             "use 'prelude' (or 'auto') here")
        self.timeout, self.cpu_seconds, self.memory = float(timeout), int(cpu_seconds), int(memory)
        self.file_size, self.max_output, self.processes = int(file_size), int(max_output), bool(processes)
        self.network_block = "namespace" if prefix else "prelude"
        self._prefix = prefix or []
        super().__init__(name=name, description=DESCRIPTION, parameters=PARAMETERS, function=self.run,
                         source=f"built-in sandbox (network blocked by {self.network_block})")

    def run(self, arguments: dict[str, Any]) -> str:
        code = arguments.get("code")
        if not isinstance(code, str):
            raise ValueError("the 'code' argument must be a string of Python code")
        top = tempfile.mkdtemp(prefix="qwen35-python-")
        try:
            return self._run_in(top, code)
        finally:
            _rmtree(top)

    def _run_in(self, top: str, code: str) -> str:
        scratch = os.path.join(top, "scratch")
        os.mkdir(scratch, 0o700)
        code_file, out_file, err_file = (os.path.join(top, n) for n in ("code.py", "stdout", "stderr"))
        with open(code_file, "w", encoding="utf-8") as f:
            f.write(code)
        env = {"HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        limits = [self.cpu_seconds, self.memory, self.file_size, -1 if self.processes else 0,
                  0 if self._prefix else 1]
        argv = [*self._prefix, sys.executable, "-I", "-X", "utf8", "-c", PRELUDE, code_file, *map(str, limits)]
        with open(out_file, "wb") as out, open(err_file, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=scratch, env=env,
                                    start_new_session=True)  # its own process group, killed as a whole below
        status, cpu, timed_out = self._wait(proc)
        stdout, stderr = _read_capped(out_file, self.max_output), _read_capped(err_file, self.max_output)
        parts = [stdout.rstrip("\n")] if stdout.strip() else []
        if stderr.strip():
            parts.append("[stderr]\n" + stderr.rstrip("\n"))
        if timed_out:
            parts.append(f"[killed: the time limit of {self.timeout:g} s was reached]")
        elif status < 0:
            sig = -status
            # the kernel's CPU accounting is coarse: a kill near the limit is the limit's
            if sig in (signal.SIGKILL, signal.SIGXCPU) and cpu >= 0.9 * self.cpu_seconds - 0.1:
                parts.append(f"[killed: the CPU time limit of {self.cpu_seconds} s was reached]")
            elif sig == signal.SIGXFSZ:
                parts.append(f"[killed: a file grew past the limit of {self.file_size} bytes]")
            else:
                parts.append(f"[killed by signal {signal.Signals(sig).name}]")
        elif status != 0:
            parts.append(f"[exit status {status}]")
        return "\n".join(parts) if parts else "(no output)"

    def _wait(self, proc: subprocess.Popen) -> tuple[int, float, bool]:
        """(exit status as Popen gives it, CPU seconds used, timed out); always kills the process group."""
        deadline = time.monotonic() + self.timeout
        pause = 0.001
        timed_out = False
        try:
            while True:
                # wait4 rather than Popen.wait: it also reports the CPU time the child used
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() >= deadline:
                    timed_out = True
                    self._kill_group(proc.pid)
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
        except BaseException:  # KeyboardInterrupt in the caller: leave nothing running
            self._kill_group(proc.pid)
            proc.wait()
            raise
        self._kill_group(proc.pid)  # whatever the code left running in the background
        proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode, usage.ru_utime + usage.ru_stime, timed_out

    @staticmethod
    def _kill_group(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
