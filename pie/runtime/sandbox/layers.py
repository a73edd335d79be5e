"""Which layers of the isolated-mode sandbox this host provides, found by starting one for real.

    for layer in probe():             # bubblewrap, user namespace and own uid, mount / pid / network
        print(layer.name, layer.present, layer.detail)   # namespaces, no_new_privs, seccomp, limits
    mode = require(policy)            # SandboxError naming what is missing, unless allow_weaker

`probe` runs `bwrap <the real sandbox options> python -c <a few checks>` once per server process and
compares what the process inside sees (its namespaces, uid, capabilities, no_new_privs, seccomp mode,
whether /etc/shadow exists, whether a raw socket opens) with the host. A layer counts as present only
when the sandboxed process shows it, not when a binary merely exists.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pie.errors import SandboxError
from pie.runtime.sandbox import bwrap, seccomp
from pie.runtime.sandbox.policy import SandboxPolicy

log = logging.getLogger(__name__)

INSTALL_BWRAP = "apt-get install bubblewrap"
INSTALL_SECCOMP = "apt-get install libseccomp2 and pip install pyseccomp"
RUN_AS_ROOT = "run the server as root (it then gives each sandbox a uid of its own)"
PROBE_TIMEOUT_S = 30.0
NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts")

# Runs inside the sandbox with `python -I -S`: stdlib only, prints one JSON object.
_PROBE = r"""
import json, os, socket, sys
if "--uid" in sys.argv:
    uid = int(sys.argv[sys.argv.index("--uid") + 1])
    os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
status = dict(line.rstrip("\n").split(":\t", 1) for line in open("/proc/self/status") if ":\t" in line)
try:
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()
    raw = "opened"
except OSError as e:
    raw = e.strerror
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "pid": os.getpid(),
    "cap_eff": int(status["CapEff"], 16), "nnp": status.get("NoNewPrivs", "0").strip(),
    "seccomp": status.get("Seccomp", "0").strip(), "raw_socket": raw,
    "ns": {n: os.stat(f"/proc/self/ns/{n}").st_ino for n in __NAMESPACES__},
    "shadow": os.path.exists("/etc/shadow"), "root": sorted(os.listdir("/")),
    "links": [l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:]],
}))
""".replace("__NAMESPACES__", repr(NAMESPACES))


@dataclass(frozen=True)
class Layer:
    name: str
    present: bool
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Mode:
    """How isolated inferlets are started on this host (what `require` settled on)."""

    bwrap: bool  # under bubblewrap; else the weaker in-process restrictions of `guard`
    seccomp: bool  # with the seccomp filter


@functools.cache
def probe() -> tuple[Layer, ...]:
    """The layers, found by starting one sandbox (cached for the life of the process)."""
    path = bwrap.bwrap_path()
    if path is None:
        missing = f"bubblewrap is not installed ({INSTALL_BWRAP})"
        return (Layer("bubblewrap", False, "not found on PATH", INSTALL_BWRAP),
                *(Layer(name, False, missing, INSTALL_BWRAP) for name in _OS_LAYERS),
                _limits_layer(own_uid=False, fix=INSTALL_BWRAP))
    try:
        seccomp.compiled()
        filter_error = ""
    except SandboxError as e:
        filter_error = str(e)
    try:
        inside = _run_probe(use_seccomp=not filter_error)
    except SandboxError as e:
        return (Layer("bubblewrap", False, f"{path} cannot start a sandbox here: {e}", _BWRAP_FIX),
                *(Layer(name, False, "bubblewrap does not run", _BWRAP_FIX) for name in _OS_LAYERS),
                _limits_layer(own_uid=False, fix=_BWRAP_FIX))
    return _judge(path, inside, filter_error)


_OS_LAYERS = ("user namespace, own uid", "mount namespace", "pid namespace", "network namespace",
              "no_new_privs", "seccomp")
_BWRAP_FIX = ("allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
              "user.max_user_namespaces > 0), or run the server as root")


def _judge(path: str, inside: dict[str, Any], filter_error: str) -> tuple[Layer, ...]:
    host = {n: os.stat(f"/proc/self/ns/{n}").st_ino for n in NAMESPACES}
    ns = inside["ns"]

    def own(name: str) -> bool:
        return ns.get(name) != host[name]

    root = os.geteuid() == 0
    uid, caps = inside["uid"], inside["cap_eff"]
    if not own("user"):
        user = Layer("user namespace, own uid", False, "no user namespace", _BWRAP_FIX)
    elif root and uid != 0 and caps == 0:
        user = Layer("user namespace, own uid", True, f"uid {uid} of its own, no capabilities")
    elif root:
        user = Layer("user namespace, own uid", False, f"uid {uid} with capabilities {caps:#x}", "report a bug")
    else:
        user = Layer("user namespace, own uid", False,
                     f"uid {uid} inside maps to the server's uid {os.getuid()} outside: the sandbox shares "
                     "its files, signals and process count with the server's user", RUN_AS_ROOT)
    links = inside["links"]
    seccomp_on = inside["seccomp"] == "2" and inside["raw_socket"] != "opened"
    return (
        Layer("bubblewrap", True, f"{path} ({_version(path)})"),
        user,
        Layer("mount namespace", own("mnt") and not inside["shadow"],
              f"root shows only {', '.join(map(str, inside['root']))}" if own("mnt") else "shares the host's",
              _BWRAP_FIX),
        Layer("pid namespace", own("pid"), f"its first process is pid {inside['pid']}", _BWRAP_FIX),
        Layer("network namespace", own("net") and links == ["lo"],
              f"interfaces: {', '.join(map(str, links))}" if isinstance(links, list) else "", _BWRAP_FIX),
        Layer("no_new_privs", inside["nnp"] == "1", f"NoNewPrivs: {inside['nnp']}", INSTALL_BWRAP),
        Layer("seccomp", seccomp_on,
              filter_error or f"filter mode {inside['seccomp']}; AF_PACKET socket: {inside['raw_socket']}",
              INSTALL_SECCOMP),
        _limits_layer(own_uid=user.present),
    )


def _limits_layer(*, own_uid: bool, fix: str = RUN_AS_ROOT) -> Layer:
    v2 = _cgroup_v2_note()
    if own_uid:
        return Layer("resource limits", True, f"rlimits: address space, CPU time, processes (per own uid), "
                     f"open files, file size; {v2}")
    return Layer("resource limits", False, f"rlimits without a process limit (RLIMIT_NPROC counts per uid and "
                 f"the sandbox has none of its own); {v2}", fix)


def _cgroup_v2_note() -> str:
    """cgroup v2 is reported, not used: the limits are rlimits either way (see docs/inferlets.md)."""
    try:
        mounts = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return "cgroup mounts unreadable"
    unified = any(line.split(" - ")[1].startswith("cgroup2 ") and line.split()[4] == "/sys/fs/cgroup"
                  for line in mounts.splitlines() if " - " in line)
    return "cgroup v2 host (pie applies rlimits)" if unified else "cgroup v1/hybrid host: rlimits"


def _version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "version unknown"
    return out.stdout.strip() or "version unknown"


def _run_probe(*, use_seccomp: bool) -> dict[str, Any]:
    policy = SandboxPolicy(cpu_time_s=10, memory_mb=0)
    scratch = Path(tempfile.mkdtemp(prefix="pie-sandbox-probe-"))
    uid = bwrap.acquire_uid(policy, f"probe-{os.getpid()}")
    launch = None
    try:
        if os.geteuid() == 0:
            os.chown(scratch, uid, uid)
        launch = bwrap.plan_launch(policy, scratch, -1, uid, [sys.executable, "-I", "-S", "-c", _PROBE],
                                   use_seccomp=use_seccomp)
        proc = subprocess.Popen(launch.argv, pass_fds=launch.pass_fds, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", start_new_session=True)
        launch.spawned()
        os.close(launch.finish_start())
        try:
            out, err = proc.communicate(timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise SandboxError(f"the probe sandbox did not finish in {PROBE_TIMEOUT_S:g} s") from None
        if proc.returncode != 0:
            raise SandboxError(err.decode(errors="replace").strip()[-500:] or f"exit code {proc.returncode}")
        try:
            result = json.loads(out)
        except ValueError:
            raise SandboxError(f"the probe printed no report: {out[-200:]!r}") from None
        assert isinstance(result, dict)
        return result
    finally:
        if launch is not None:
            launch.close()
        bwrap.release_uid(uid)
        shutil.rmtree(scratch, ignore_errors=True)


def require(policy: SandboxPolicy) -> Mode:
    """How to start sandboxes under `policy`; SandboxError naming each missing layer and its fix,
    unless `[sandbox] allow_weaker` accepts what this host has."""
    layers = probe()
    missing = [layer for layer in layers if not layer.present]
    by_name = {layer.name: layer for layer in layers}
    mode = Mode(bwrap=by_name["mount namespace"].present, seccomp=by_name["seccomp"].present)
    if not missing:
        return mode
    text = "; ".join(f"{layer.name}: {layer.detail} (fix: {layer.fix})" for layer in missing)
    if not policy.allow_weaker:
        raise SandboxError(f"isolated mode needs every layer of the OS sandbox, and this host lacks: {text}. "
                           "Fix those, or set [sandbox] allow_weaker = true to run with what there is "
                           "(`pie doctor` lists the layers)")
    _warn_once(text)
    return mode


@functools.cache
def _warn_once(text: str) -> None:
    log.warning("isolated mode runs with a weaker sandbox ([sandbox] allow_weaker = true); missing: %s", text)
