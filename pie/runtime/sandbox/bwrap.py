"""The operating-system sandbox of one inferlet process: a bubblewrap (`bwrap`) command line.

    plan = plan_launch(policy, scratch, sock_fd, uid)
    proc = await asyncio.create_subprocess_exec(*plan.argv, pass_fds=plan.pass_fds, ...)
    ns = await plan.started()     # the namespace's init process (kill it and everything inside dies)

What the process gets (each is a kernel mechanism, not something the inferlet's interpreter can undo):

- a user namespace and its own uid/gid, unique per sandbox (`acquire_uid`). When the server runs as
  root, the map is `0 -> 0, N -> N` (written by us through `--userns-block-fd`: bwrap's own map would
  make the sandbox's uid the server's, root) and the sandbox starts with only CAP_SETUID/CAP_SETGID,
  which `child.py` uses once, first thing, to become uid/gid N for good (no groups, no capabilities):
  outside the sandbox it is then a real unprivileged uid, so file permissions, signals and
  RLIMIT_NPROC (a per-uid count) all apply to it alone. Without root, bwrap maps N to the server's
  own uid: the namespaces hold, but outside them the sandbox is the server's user (`layers` says so).
- a mount namespace whose root is an empty tmpfs with, read-only, /usr (with the /bin, /lib, ...
  links), the Python installation (sys.base_prefix, sys.prefix), the `pie` and `inferlet` packages and
  /etc/ld.so.cache; read-write, only the instance's scratch folder; plus its own /dev (null, zero,
  random, ...), the /proc of its pid namespace and a fresh /tmp (a tmpfs of `max_file_mb`).
- a pid namespace (it sees only itself; the server and other sandboxes do not exist for it; when its
  init dies the kernel kills everything in it), `--die-with-parent`, `--new-session` (no terminal).
- a network namespace with only a loopback device, unless the policy allows the network; and its own
  IPC and UTS (hostname) namespaces.
- no_new_privs (bwrap always sets it) and the seccomp filter of `pie.runtime.sandbox.seccomp`.

The socket to the runtime is an inherited descriptor (bwrap keeps descriptors it is not told about),
so the sandbox needs no path to reach the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pie.errors import SandboxError
from pie.runtime.sandbox import seccomp
from pie.runtime.sandbox.policy import SandboxPolicy

SANDBOX_CAPS = ("CAP_SETUID", "CAP_SETGID")  # root mode: exactly what child.py needs to drop to its uid
_uids_in_use: set[int] = set()


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def acquire_uid(policy: SandboxPolicy, instance_id: str) -> int:
    """A uid in [uid_base, uid_base + uid_span) that no other sandbox of this server has now: a
    hash of the instance id (so two servers on one host rarely meet), then the next free one."""
    start = int.from_bytes(hashlib.blake2b(instance_id.encode(), digest_size=8).digest(), "big")
    for step in range(policy.uid_span):
        uid = policy.uid_base + (start + step) % policy.uid_span
        if uid not in _uids_in_use:
            _uids_in_use.add(uid)
            return uid
    raise SandboxError(f"all {policy.uid_span} sandbox uids are in use; raise [sandbox] uid_span")


def release_uid(uid: int) -> None:
    _uids_in_use.discard(uid)


@dataclass
class Launch:
    """One bwrap invocation: its argv and descriptors, and the pipes to finish its start."""

    argv: list[str]
    pass_fds: list[int]
    uid: int  # the sandbox's uid (inside; and outside when `switch_uid`)
    switch_uid: bool  # root mode: child.py switches to `uid` itself; we write the uid map
    _info_read: int = -1
    _block_write: int = -1
    _child_ends: list[int] = field(default_factory=list)
    _start_begun: bool = False  # from then on `finish_start` owns (and closes) the pipes

    def spawned(self) -> None:
        """Close our copies of the descriptors only bwrap needs (call right after the spawn)."""
        for fd in self._child_ends:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._child_ends.clear()

    def finish_start(self) -> int:
        """Blocking: a pidfd of the namespace's init, once the sandbox may run (root mode: after
        writing its uid map). SandboxError if bwrap ended before starting it. The caller closes it."""
        self._start_begun = True
        try:
            info = _read_all(self._info_read)
            try:
                pid = int(json.loads(info)["child-pid"])
            except (ValueError, KeyError, TypeError):
                raise SandboxError("bubblewrap did not start the sandbox (no child pid on its info fd)") from None
            try:
                # Opened before the sandbox is released (root mode), so the pid cannot be another's yet.
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                raise SandboxError("the sandbox's init process ended during its start") from None
            if self.switch_uid:
                try:
                    _write_id_maps(pid, self.uid)
                    os.write(self._block_write, b"1")
                except BaseException:
                    os.close(pidfd)
                    raise
            return pidfd
        finally:
            self.close()

    async def started(self) -> int:
        """`finish_start` off the event loop. Cancelled meanwhile, the pidfd it still returns is closed
        (the namespace then dies with bwrap: `--die-with-parent`)."""
        task = asyncio.ensure_future(asyncio.to_thread(self.finish_start))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_close_result)
            raise

    def close_unstarted(self) -> None:
        """Close the pipes unless `finish_start` runs or ran (it closes them itself; closing them under a
        reading thread could let it read a reused descriptor)."""
        if not self._start_begun:
            self.close()

    def close(self) -> None:
        for fd in (self._info_read, self._block_write, *self._child_ends):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._info_read = self._block_write = -1
        self._child_ends.clear()


def plan_launch(policy: SandboxPolicy, scratch: Path, sock_fd: int, uid: int, command: list[str], *,
                use_seccomp: bool = True, read_only: Iterable[str] = ()) -> Launch:
    """The bwrap command running `command` for one sandbox, passing it `sock_fd` (-1: none);
    `read_only`: more folders it may read (the program's installed dependencies). When
    the server is root, `--uid <uid>` is appended to `command`: the sandboxed process must switch to
    that uid itself, first thing (`child.become`)."""
    bwrap = bwrap_path()
    if bwrap is None:
        raise SandboxError("bubblewrap (bwrap) is not installed: `apt-get install bubblewrap`, or set "
                           "[sandbox] allow_weaker = true to run isolated inferlets without it")
    root = os.geteuid() == 0
    argv = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", "sandbox",
            "--unshare-cgroup-try", "--new-session", "--die-with-parent", "--chdir", "/"]
    if not policy.allow_network:
        argv.append("--unshare-net")
    if root:
        argv += ["--cap-drop", "ALL"] + [a for cap in SANDBOX_CAPS for a in ("--cap-add", cap)]
    else:
        argv += ["--uid", str(uid), "--gid", str(uid)]
    tmp_bytes = (policy.max_file_mb or 1024) * 1024 * 1024
    argv += ["--dev", "/dev", "--proc", "/proc", "--perms", "1777", "--size", str(tmp_bytes), "--tmpfs", "/tmp"]
    read_only = [*read_only_paths(), *read_only]
    for directory in _ancestors([*read_only, str(scratch), "/etc/ld.so.cache"]):
        argv += ["--perms", "0755", "--dir", directory]  # bwrap would make missing parents 0700
    for path in read_only:
        argv += ["--ro-bind", path, path]
    argv += _root_links()
    for path in ("/etc/ld.so.cache", "/etc/localtime", *(_NETWORK_FILES if policy.allow_network else ())):
        argv += ["--ro-bind-try", path, path]
    argv += ["--bind", str(scratch), str(scratch)]
    info_read, info_write = os.pipe()
    child_ends = [info_write]
    argv += ["--info-fd", str(info_write)]
    if use_seccomp:
        filter_fd = seccomp.filter_fd()
        child_ends.append(filter_fd)
        argv += ["--seccomp", str(filter_fd)]
    block_write = -1
    if root:
        block_read, block_write = os.pipe()
        child_ends.append(block_read)
        argv += ["--userns-block-fd", str(block_read)]
    argv += ["--", *command, *(["--uid", str(uid)] if root else [])]
    passed = [fd for fd in (sock_fd, *child_ends) if fd >= 0]
    return Launch(argv, passed, uid, root, info_read, block_write, child_ends)


_NETWORK_FILES = ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/ssl/certs")


@functools.cache
def read_only_paths() -> tuple[str, ...]:
    """What the sandbox may read: /usr, the Python installation and the pie and inferlet packages."""
    import inferlet
    import pie

    paths = {"/usr", sys.base_prefix, sys.prefix, sys.exec_prefix, os.path.dirname(pie.__file__),
             os.path.dirname(inferlet.__file__),
             # the real interpreter's installation (a venv's python is a link into it)
             os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}
    paths = {p for p in paths if p and os.path.isdir(p)}
    # a path reached through a link is bound at both places, so either spelling works inside
    return tuple(_dedupe({os.path.realpath(p) for p in paths} | paths))


def package_roots() -> list[str]:
    """The folders holding `pie` and `inferlet` (the sandbox's PYTHONPATH)."""
    import inferlet
    import pie

    return sorted({os.path.dirname(os.path.dirname(m.__file__ or "")) for m in (pie, inferlet)})


def _dedupe(paths: Iterable[str]) -> list[str]:
    """Drop paths inside another one (each is bound once; a nested bind would be redundant)."""
    kept: list[str] = []
    for path in sorted(set(paths), key=len):
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return sorted(kept)


def _ancestors(paths: Iterable[str]) -> list[str]:
    out: set[str] = set()
    for path in paths:
        out.update(str(p) for p in Path(path).parents if str(p) not in ("/", "/tmp"))
    return sorted(out, key=lambda p: (p.count("/"), p))


def _root_links() -> list[str]:
    """/bin, /lib, /lib64, /sbin: links into /usr on merged-/usr systems, else bound read-only."""
    out: list[str] = []
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(name):
            out += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            out += ["--ro-bind", name, name]
    return out


def _close_result(task: asyncio.Future[int]) -> None:
    if not task.cancelled() and task.exception() is None:
        os.close(task.result())


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_id_maps(pid: int, uid: int) -> None:
    """Map 0 -> 0 (bwrap's setup runs as the namespace's root) and uid -> uid (the sandbox itself)."""
    mapping = f"0 0 1\n{uid} {uid} 1\n"
    try:
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(mapping)
    except OSError as e:
        raise SandboxError(f"could not write the sandbox's uid map (/proc/{pid}/uid_map): {e}") from None
