"""The seccomp filter of a sandbox: the system calls an inferlet never needs and an escape would.

    fd = filter_fd()          # a memfd holding the compiled BPF program
    bwrap --seccomp <fd> ...  # bubblewrap installs it (after no_new_privs) right before exec

Built with libseccomp (through `pyseccomp`, a ctypes binding to the system's libseccomp2) rather than
hand-assembled BPF: libseccomp knows every architecture's syscall numbers, emits the audit-arch check
(a call made under another ABI, e.g. i386 `int 0x80` on x86_64, hits the bad-arch action and kills the
process) and handles the x32 ABI, which a hand-written filter easily gets wrong.

Everything is allowed except the calls below, which fail with EPERM (so Python raises a clean
`PermissionError` instead of the process dying mysteriously):

- debugging other processes: ptrace, process_vm_readv/writev, kcmp, pidfd_getfd;
- the file-system tree and namespaces: mount and the new mount API, umount2, pivot_root, chroot,
  unshare, setns, and clone() with any CLONE_NEW* flag (clone3 gets ENOSYS: its flags sit in memory
  seccomp cannot read, and libc then falls back to clone, which is checked);
- kernel keyrings: add_key, request_key, keyctl;
- raw network access: socket(AF_PACKET, ...) and socket(..., SOCK_RAW, ...);
- the kernel itself: kexec_load, kexec_file_load, init/finit/delete_module, bpf, perf_event_open,
  userfaultfd, io_uring (its requests bypass seccomp), reboot, swapon/off, syslog, acct, quotactl,
  the clocks (settimeofday, clock_settime, adjtimex, clock_adjtime), iopl/ioperm,
  open_by_handle_at / name_to_handle_at (a classic container escape), lookup_dcookie,
  TIOCSTI/TIOCLINUX ioctls (typing into a terminal).
"""

from __future__ import annotations

import errno
import functools
import os
import socket
from typing import Any

from pie.errors import SandboxError

# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
CLONE_NEW_ANY = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80
SOCK_TYPE_MASK = 0xF
TIOCSTI, TIOCLINUX = 0x5412, 0x541C

DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    "add_key", "request_key", "keyctl",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "bpf", "perf_event_open",
    "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "reboot", "swapon", "swapoff",
    "syslog", "acct", "quotactl", "settimeofday", "clock_settime", "adjtimex", "clock_adjtime", "iopl",
    "ioperm", "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "uselib", "vhangup",
)


def filter_fd() -> int:
    """A new read-only file descriptor with the compiled filter (each bwrap call consumes its own)."""
    fd = os.memfd_create("pie-seccomp", os.MFD_CLOEXEC)
    os.write(fd, compiled())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@functools.cache
def compiled() -> bytes:
    """The BPF program for this machine's architecture; SandboxError when libseccomp is unavailable."""
    try:
        import pyseccomp as sc
    except (ImportError, RuntimeError, OSError) as e:  # RuntimeError: the binding found no libseccomp.so
        raise SandboxError(f"seccomp: libseccomp is not usable ({e}); install the Debian package libseccomp2 "
                           "and `pip install pyseccomp`") from None
    f = sc.SyscallFilter(sc.ALLOW)
    deny = sc.ERRNO(errno.EPERM)
    for name in DENIED:
        _rule(sc, f, deny, name)
    for bit in _bits(CLONE_NEW_ANY):  # one rule per flag: libseccomp ANDs the conditions of one rule
        _rule(sc, f, deny, "clone", sc.Arg(0, sc.MASKED_EQ, bit, bit))
    _rule(sc, f, sc.ERRNO(errno.ENOSYS), "clone3")
    _rule(sc, f, deny, "socket", sc.Arg(0, sc.EQ, socket.AF_PACKET))
    _rule(sc, f, deny, "socket", sc.Arg(1, sc.MASKED_EQ, SOCK_TYPE_MASK, socket.SOCK_RAW))
    for request in (TIOCSTI, TIOCLINUX):
        _rule(sc, f, deny, "ioctl", sc.Arg(1, sc.EQ, request))
    fd = os.memfd_create("pie-seccomp-build", os.MFD_CLOEXEC)
    try:
        with os.fdopen(fd, "w+b", closefd=False) as out:
            f.export_bpf(out)
        size = os.lseek(fd, 0, os.SEEK_END)
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def _rule(sc: Any, f: Any, action: int, name: str, *args: Any) -> None:
    if sc.resolve_syscall(sc.system_arch(), name) < 0:
        return  # a call this architecture does not have (e.g. iopl on aarch64): nothing to deny
    f.add_rule(action, name, *args)


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(mask.bit_length()) if mask >> i & 1]
