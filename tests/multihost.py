"""Extra libvirt "hosts" on this one machine, for tests that need several hypervisors.

Each host is a libvirtd in a mount (and UTS) namespace of its own, with private
directories bind-mounted over /etc/libvirt, /run/libvirt, /var/lib/libvirt,
/var/cache/libvirt and /var/log/libvirt, listening on its own loopback address
(``qemu+tcp://127.0.0.N/system``, no authentication: tests only). Its hostname, as
``getHostname()`` reports it, is the host's name ("h2"). Paths outside the five
bind mounts (disk images under /var/tmp, say) are shared by every host, as shared
storage would be.

Nothing reaps orphans on this machine, and QEMU daemonizes. So each libvirtd runs
under a small supervisor (a Python process that is a child subreaper): it adopts and
reaps the QEMU processes, and it stays alive until the last of them has exited, even
after its libvirtd was killed (``TestHost.kill()``). Processes are only ever signalled
by the pids in this host's own files, never by name.

    hosts = start_hosts(Path("/var/tmp/corral-test-x"), 3)   # h2..h4 at 127.0.0.2..4
    try:
        conn = libvirt.open(hosts[0].uri)
        ...
    finally:
        stop_hosts(hosts)   # destroys their guests, stops them, removes their dirs
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0

# The five paths every host gets a private copy of, as (host path, name under root).
PRIVATE_DIRS = (
    ("/etc/libvirt", "etc"),
    ("/run/libvirt", "run"),
    ("/var/lib/libvirt", "lib"),
    ("/var/cache/libvirt", "cache"),
    ("/var/log/libvirt", "log"),
)

# Directories whose owner and mode are copied from the main host's, so that QEMU
# (running as libvirt-qemu) can write its monitor socket, logs and so on.
OWNED_DIRS = (
    ("/var/lib/libvirt/qemu", "lib/qemu"),
    ("/var/cache/libvirt/qemu", "cache/qemu"),
    ("/var/log/libvirt/qemu", "log/qemu"),
    ("/run/libvirt/qemu", "run/qemu"),
)

MAIN_CAPS_CACHE = Path("/var/cache/libvirt/qemu/capabilities")

# Runs ``argv`` as its child, adopts every orphan below it (PR_SET_CHILD_SUBREAPER),
# reaps them all, and exits when no descendant is left, with its child's status.
_SUPERVISOR = r"""
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
signal.signal(signal.SIGINT, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.execvp(sys.argv[1], sys.argv[1:])
status = 0
while True:
    try:
        child, code = os.wait()
    except ChildProcessError:
        break
    if child == pid:
        status = os.waitstatus_to_exitcode(code)
sys.exit(status if status >= 0 else 128 - status)
"""

_quiet_lock = threading.Lock()


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    pass


def _quiet_libvirt() -> None:
    """Keep libvirt from printing every refused connection while a host starts."""
    with _quiet_lock:
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is(pid: int, program: str) -> bool:
    """Whether ``pid`` runs ``program`` (guards against a recycled pid)."""
    argv = _cmdline(pid)
    return bool(argv) and Path(argv[0]).name.startswith(program)


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


def _copy_owner(src: str, dst: Path) -> None:
    st = os.stat(src)
    dst.mkdir(parents=True, exist_ok=True)
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, st.st_mode & 0o7777)


@dataclass
class TestHost:
    """One extra libvirtd; ``root`` holds its private directories, pid file and logs."""

    __test__ = False  # not a pytest test class, despite its name

    name: str
    address: str
    uri: str
    root: Path
    pid: int | None = None
    copy_capabilities: bool = True
    # Supervisors started by this object; an old one lives on after kill() while
    # it still has guests to reap.
    _supervisors: list[subprocess.Popen[bytes]] = field(
        default_factory=list, repr=False, compare=False
    )
    # What the last stop() had to force (guests that needed killing, and so on).
    problems: list[str] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def create(cls, base: Path, number: int) -> TestHost:
        name = f"h{number}"
        address = f"127.0.0.{number}"
        return cls(name, address, f"qemu+tcp://{address}/system", base / "hosts" / name)

    # --- files ----------------------------------------------------------------

    @property
    def pid_file(self) -> Path:
        return self.root / "libvirtd.pid"

    @property
    def log_file(self) -> Path:
        """libvirtd's own log (log_outputs); stdout and stderr go to libvirtd.out."""
        return self.root / "libvirtd.log"

    @property
    def out_file(self) -> Path:
        return self.root / "libvirtd.out"

    def _read_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) and _is(pid, "libvirtd") else None

    @property
    def running(self) -> bool:
        """Whether this host's libvirtd (per its own pid file) is alive."""
        self.pid = self._read_pid()
        return self.pid is not None

    def _prepare(self) -> None:
        """Make the private dirs (once; a restart keeps its state like a real host)."""
        if (self.root / "etc" / "libvirtd.conf").exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        for path, sub in PRIVATE_DIRS:
            _copy_owner(path, self.root / sub)
        etc = self.root / "etc"
        # Only the daemons' configuration: not the main host's domains, networks,
        # pools, secrets or hooks, which must not show up (or run) on this host.
        for conf in Path("/etc/libvirt").glob("*.conf"):
            shutil.copy2(conf, etc / conf.name)
        if Path("/etc/libvirt/nwfilter").is_dir():
            shutil.copytree("/etc/libvirt/nwfilter", etc / "nwfilter")
        (etc / "qemu" / "networks" / "autostart").mkdir(parents=True)
        with (etc / "libvirtd.conf").open("a") as f:
            f.write(
                "\n# corral test host\n"
                "listen_tcp = 1\n"
                "listen_tls = 0\n"
                f'listen_addr = "{self.address}"\n'
                'auth_tcp = "none"\n'
                f'host_uuid = "{uuid.uuid4()}"\n'
                f'log_outputs = "2:file:{self.log_file}"\n'
            )
        with (etc / "qemu.conf").open("a") as f:
            f.write('\n# corral test host\nstdio_handler = "file"\n')
        for main, sub in OWNED_DIRS:
            _copy_owner(main, self.root / sub)
        if self.copy_capabilities and MAIN_CAPS_CACHE.is_dir():
            caps = self.root / "cache" / "qemu" / "capabilities"
            _copy_owner(str(MAIN_CAPS_CACHE), caps)
            for xml in MAIN_CAPS_CACHE.glob("*.xml"):
                shutil.copy2(xml, caps / xml.name)

    # --- life cycle -----------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start libvirtd unless it runs; return once ``libvirt.open(uri)`` works."""
        if self.running and self._answers():
            return
        if self.pid is not None:  # alive but not answering: not ours to guess about
            raise RuntimeError(f"{self.name}: libvirtd {self.pid} runs but does not answer")
        self._prepare()
        mounts = " && ".join(
            f"mount --bind {self.root / sub} {path}" for path, sub in PRIVATE_DIRS
        )
        script = (
            f"{mounts} && hostname {self.name} && "
            f"exec libvirtd --listen --pid-file {self.pid_file}"
        )
        argv = [
            sys.executable, "-c", _SUPERVISOR,
            "unshare", "--mount", "--uts", "--propagation", "private",
            "sh", "-c", script,
        ]
        with self.out_file.open("ab") as out:
            sup = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        self._supervisors.append(sup)
        _quiet_libvirt()
        deadline = time.monotonic() + timeout
        while True:
            if self.running and self._answers():
                return
            if time.monotonic() > deadline:
                problem = f"did not answer within {timeout:.0f} s"
                break
            if sup.poll() is not None and not self.running:
                problem = f"exited with status {sup.returncode}"
                break
            time.sleep(0.05)
        raise RuntimeError(
            f"test host {self.name} ({self.uri}): libvirtd {problem}.\n"
            f"--- {self.out_file}:\n{_tail(self.out_file)}\n"
            f"--- {self.log_file}:\n{_tail(self.log_file)}"
        )

    def _answers(self) -> bool:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError:
            return False
        conn.close()
        return True

    def kill(self) -> None:
        """SIGKILL libvirtd only, as a host crash would; its guests keep running."""
        pid = self._read_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        if not _wait_gone([pid], STOP_TIMEOUT):
            raise RuntimeError(f"{self.name}: libvirtd {pid} survived SIGKILL")
        self.pid = None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Destroy its guests, stop libvirtd (SIGTERM, then SIGKILL), reap everything."""
        problems: list[str] = []
        if self.running:
            self._destroy_domains(problems)
        pid = self._read_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            if not _wait_gone([pid], timeout):
                problems.append(f"libvirtd {pid} ignored SIGTERM; killed")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone([pid], timeout)
        self.pid = None
        # Last resort: the QEMU processes this host's libvirtd recorded.
        qemus = []
        for pid_path in (self.root / "run" / "qemu").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                qpid = int(pid_path.read_text().strip())
                if _alive(qpid) and _is(qpid, "qemu"):
                    qemus.append(qpid)
        for qpid in qemus:
            problems.append(f"qemu {qpid} outlived its libvirtd; killed")
            with contextlib.suppress(ProcessLookupError):
                os.kill(qpid, signal.SIGKILL)
        if not _wait_gone(qemus, timeout):
            problems.append(f"qemu processes {qemus} survived SIGKILL")
        for sup in self._supervisors:
            try:
                sup.wait(timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"supervisor {sup.pid} still has children; killed")
                sup.kill()
                sup.wait(timeout)
        self._supervisors.clear()
        self.problems = problems

    def _destroy_domains(self, problems: list[str]) -> None:
        _quiet_libvirt()
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            problems.append(f"could not connect to destroy guests: {e}")
            return
        try:
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    dom.destroy()
                except libvirt.libvirtError as e:
                    problems.append(f"destroy {dom.name()}: {e}")
        finally:
            conn.close()


def _in_parallel(hosts: list[TestHost], action: Callable[[TestHost], None]) -> list[BaseException]:
    errors: list[BaseException] = []
    if not hosts:
        return errors
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        for future in [pool.submit(action, h) for h in hosts]:
            exc = future.exception()
            if exc is not None:
                errors.append(exc)
    return errors


@contextlib.contextmanager
def connection(uri: str) -> Iterator[libvirt.virConnect]:
    """A libvirt connection to ``uri``, closed however the block ends."""
    conn = libvirt.open(uri)
    try:
        yield conn
    finally:
        conn.close()


def start_hosts(base: Path, count: int, first_address: int = 2) -> list[TestHost]:
    """Start ``count`` hosts h<N> at 127.0.0.N (N from ``first_address``), in parallel.

    Their directories are under ``base/hosts``. If any fails to start, all are
    stopped and removed again before the error is raised.
    """
    if first_address < 2 or first_address + count - 1 > 254:
        raise ValueError("addresses must stay within 127.0.0.2 .. 127.0.0.254")
    hosts = [TestHost.create(base, n) for n in range(first_address, first_address + count)]
    errors = _in_parallel(hosts, lambda h: h.start())
    if errors:
        stop_hosts(hosts)
        raise errors[0]
    return hosts


def stop_hosts(hosts: list[TestHost]) -> None:
    """Stop every host (guests too) and remove its directories, whatever state it is in."""
    errors = _in_parallel(hosts, lambda h: h.stop())
    for host in hosts:
        shutil.rmtree(host.root, ignore_errors=True)
    if errors:
        raise errors[0]
