"""Restrictions a sandbox process applies to itself before it runs any inferlet code.

Under bubblewrap (`pie.runtime.sandbox.bwrap`, the normal isolated mode) the boundary is the
operating system's: namespaces, its own uid, seccomp. Here only 2, 3 and 5 below apply, plus
RLIMIT_NPROC when the sandbox has a uid of its own; the audit hook (5) is defence in depth only: an
inferlet can neutralise it (it runs in the inferlet's own interpreter), and nothing relies on it.

Without bubblewrap (`[sandbox] allow_weaker = true` on a host that lacks it) all of 1-5 apply, in
order, and this is what each one is worth:

1. Network namespace (`unshare(CLONE_NEWNET)`, when running as root and the network is not allowed):
   kernel-enforced; the process sees only a down loopback device. Without the privilege it is skipped
   and only step 5 stands between the inferlet and the network.
2. Resource limits (`setrlimit`): kernel-enforced. CPU seconds (the kernel kills the process at the
   hard limit), address space (allocations fail beyond it), open files, file size, no core dumps.
3. Working directory: the instance's scratch folder.
4. Own uid (when running as root and the Python installation is readable by other users): the
   process switches to a per-user uid with no groups, so file permissions, signals and ptrace are
   kernel-checked against an unprivileged user. If Python lives somewhere only root can read (as in a
   root-owned pyenv), switching would break imports, so it is skipped and reported.
5. An audit hook (PEP 578): refuses opening files outside the scratch folder for writing and outside
   the Python installation and the scratch folder for reading, changing or listing paths outside
   them, starting processes, `fork`, `kill`, loading native code through ctypes, and (without
   network) creating sockets. Audit hooks run inside the process they guard: native code can bypass
   them, so they are a second line behind 1, 2 and 4 (and the only line against reading readable
   files when 4 is skipped). They are not a sandbox on their own (the Python docs say so too).

The sandbox's own socket to the runtime was opened before any of this and stays usable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import site
import socket
import stat
import sys
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pie.runtime.sandbox.policy import SandboxPolicy

CLONE_NEWNET = 0x40000000
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_BLOCKED_EVENTS = frozenset({
    "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "os.startfile", "ctypes.dlopen",
    "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function", "ctypes.addressof", "ctypes.cdata",
    "ctypes.cdata/buffer", "ctypes.string_at", "ctypes.wstring_at", "ctypes.memmove", "ctypes.memset",
    "sys.settrace", "sys.setprofile", "os.chroot", "os.setuid", "os.setgid",
})
_NETWORK_EVENTS = frozenset({"socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
                             "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
                             "socket.gethostbyaddr", "socket.getnameinfo"})
# Events whose leading string arguments are paths that must stay inside the scratch folder.
_WRITE_PATH_EVENTS = frozenset({"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                                "os.link", "os.symlink", "os.truncate", "os.utime", "os.chflags",
                                "os.mkfifo", "os.mknod", "shutil.rmtree", "shutil.move", "shutil.copyfile"})
_READ_PATH_EVENTS = frozenset({"os.listdir", "os.scandir", "glob.glob", "os.chdir"})


@dataclass(frozen=True)
class Applied:
    """What was actually enforced (the sandbox reports it to the runtime at start)."""

    uid: int
    network: str  # "namespace" | "audit-hook" | "allowed"
    uid_note: str
    rlimits: dict[str, int]


def apply(policy: SandboxPolicy, scratch: Path, username: str, *, os_sandbox: bool = False,
          own_uid: bool = False, readable: Iterable[str] = ()) -> Applied:
    """`os_sandbox`: running under bubblewrap (namespaces and uid are done); `own_uid`: the sandbox's
    uid is its own outside the sandbox too, so a per-uid process limit counts only its processes;
    `readable`: more folders it may read (the program's installed dependencies)."""
    extra = [os.path.realpath(p) for p in readable]
    if os_sandbox:
        network = "allowed" if policy.allow_network else "namespace"
        rlimits = _set_rlimits(policy, nproc=own_uid)
        uid_note = (f"own uid {os.getuid()} (bubblewrap)" if own_uid else
                    f"uid {os.getuid()} in a user namespace, the server's user outside it (server not root)")
        os.chdir(scratch)
        sys.addaudithook(_make_hook(scratch, [*read_roots(), *extra], policy.allow_network))
        return Applied(os.getuid(), network, uid_note, rlimits)
    network = _isolate_network(policy.allow_network)
    rlimits = _set_rlimits(policy, nproc=False)
    os.chdir(scratch)
    uid_note = _drop_uid(policy, scratch, username)
    sys.addaudithook(_make_hook(scratch, [*read_roots(), *extra], policy.allow_network))
    return Applied(os.getuid(), network, uid_note, rlimits)


def _isolate_network(allowed: bool) -> str:
    if allowed:
        return "allowed"
    if os.geteuid() != 0:
        return "audit-hook"
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return "namespace" if libc.unshare(CLONE_NEWNET) == 0 else "audit-hook"


def _set_rlimits(policy: SandboxPolicy, *, nproc: bool) -> dict[str, int]:
    applied: dict[str, int] = {"RLIMIT_CORE": 0}
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    wanted = {
        "RLIMIT_CPU": policy.cpu_time_s,
        "RLIMIT_AS": policy.memory_mb * 1024 * 1024,
        "RLIMIT_NOFILE": policy.max_open_files,
        "RLIMIT_FSIZE": policy.max_file_mb * 1024 * 1024,
        # processes and threads of this uid; only meaningful when the uid is the sandbox's alone
        "RLIMIT_NPROC": policy.max_processes if nproc else 0,
    }
    for name, value in wanted.items():
        if value:
            # CPU: SIGXCPU at the soft limit, SIGKILL one second later if it is caught.
            hard = value + 1 if name == "RLIMIT_CPU" else value
            resource.setrlimit(getattr(resource, name), (value, hard))
            applied[name] = value
    return applied


def _drop_uid(policy: SandboxPolicy, scratch: Path, username: str) -> str:
    if not policy.drop_uid:
        return "uid switching disabled by policy"
    if os.geteuid() != 0:
        return f"not root (uid {os.geteuid()}): the sandbox keeps the server's uid"
    unreadable = [p for p in _python_paths() if not _world_readable(p)]
    if unreadable:
        return (f"kept uid 0: {unreadable[0]} is not readable by other users, so an unprivileged uid could "
                "not import Python modules; install pie somewhere world-readable to enable uid switching")
    uid = policy.uid_for(username)
    os.chown(scratch, uid, uid)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    return f"switched to uid {uid}"


def _python_paths() -> list[Path]:
    import inferlet
    import pie

    paths = {Path(os.path.realpath(sys.executable)), Path(sysconfig.get_paths()["stdlib"]),
             Path(pie.__file__).parent, Path(inferlet.__file__).parent, *map(Path, site.getsitepackages())}
    return sorted(paths)


def _world_readable(path: Path) -> bool:
    """`path` and every directory above it can be reached (o+x) and read (o+r) by any user."""
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH and stat.S_ISDIR(mode):
            return False
    return bool(path.stat().st_mode & stat.S_IROTH)


def read_roots() -> list[str]:
    """Where a sandbox may read: the Python installation and pie's own packages."""
    import inferlet
    import pie

    paths = sysconfig.get_paths()
    roots = {paths["stdlib"], paths["platstdlib"], paths["purelib"], paths["platlib"], sys.prefix,
             sys.base_prefix, sys.exec_prefix, *site.getsitepackages(), os.path.dirname(pie.__file__),
             os.path.dirname(inferlet.__file__), "/usr/share/zoneinfo", "/dev/null", "/dev/urandom",
             "/dev/random", "/etc/localtime"}
    roots |= {p for p in sys.path if p.endswith((".zip", "lib-dynload"))}
    return sorted(os.path.realpath(r) for r in roots if r)


def _local_socket(event: str, args: tuple[Any, ...]) -> bool:
    """A new AF_UNIX socket (asyncio's socketpairs) is no network; connecting it anywhere still is refused."""
    return event == "socket.__new__" and len(args) > 1 and args[1] == socket.AF_UNIX


def _make_hook(scratch: Path, readable: Iterable[str], allow_network: bool) -> Callable[[str, tuple[Any, ...]], None]:
    home = os.path.realpath(scratch)
    read_only = tuple(readable)

    def inside(path: Any, roots: tuple[str, ...]) -> bool:
        if isinstance(path, int):  # an already open descriptor
            return True
        full = os.path.realpath(os.fsdecode(path))
        return any(full == r or full.startswith(r.rstrip("/") + "/") for r in roots)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = (*args, None, None)[:3]
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
            if not inside(path, (home,) if writing else (home, *read_only)):
                raise PermissionError(f"sandbox: {'writing' if writing else 'reading'} {path!r} is not allowed; "
                                      f"only the scratch folder {home} is writable")
        elif event in _BLOCKED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event in _NETWORK_EVENTS and not allow_network and not _local_socket(event, args):
            raise PermissionError(f"sandbox: network access ({event}) is not allowed")
        elif event in _WRITE_PATH_EVENTS:
            for path in args[:2]:
                if isinstance(path, str | bytes | os.PathLike) and not inside(path, (home,)):
                    raise PermissionError(f"sandbox: {event} on {path!r} is outside the scratch folder")
        elif event in _READ_PATH_EVENTS:
            path = args[0] if args else None
            if isinstance(path, str | bytes | os.PathLike) and not inside(path, (home, *read_only)):
                raise PermissionError(f"sandbox: {event} on {path!r} is not allowed")

    return hook
