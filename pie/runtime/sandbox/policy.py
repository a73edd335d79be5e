"""What a sandboxed inferlet may use: CPU time, memory, processes, files, network, and the uid it runs as."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pie.errors import ConfigError


@dataclass(frozen=True)
class SandboxPolicy:
    """Limits of one sandbox process (one inferlet instance). 0 disables a limit.

    cpu_time_s: CPU seconds (RLIMIT_CPU; the kernel stops the process at the limit).
    memory_mb: address space (RLIMIT_AS); allocations beyond it fail with MemoryError.
    max_open_files / max_file_mb: RLIMIT_NOFILE / RLIMIT_FSIZE (also the size of the sandbox's /tmp).
    max_processes: processes and threads (RLIMIT_NPROC, counted per uid: applied when the sandbox has
      a uid of its own, i.e. bubblewrap started by a root server).
    allow_network: without it the sandbox gets an empty network namespace where the kernel allows
      one (root), and socket creation is refused by an audit hook in any case.
    scratch_root: the inferlet's working directory is `<scratch_root>/<user>/<instance>`, the only
      place it may write; removed when the instance ends unless `keep_scratch`.
    drop_uid: (without bubblewrap) when the server runs as root, run the sandbox as a per-user uid
      in [uid_base, uid_base + uid_span) (no passwd entry needed). Under bubblewrap every sandbox gets
      a uid of that range that no other running sandbox has.
    allow_weaker: start isolated mode even when a layer of the OS sandbox is missing on this host
      (`pie doctor` lists them), e.g. without bubblewrap; the server refuses otherwise.
    """

    cpu_time_s: int = 300
    memory_mb: int = 4096
    max_open_files: int = 256
    max_file_mb: int = 256
    allow_network: bool = False
    scratch_root: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "pie-sandbox")
    keep_scratch: bool = False
    drop_uid: bool = True
    uid_base: int = 60_000_000
    uid_span: int = 1_000_000
    max_processes: int = 64
    allow_weaker: bool = False

    def __post_init__(self) -> None:
        for name in ("cpu_time_s", "memory_mb", "max_open_files", "max_file_mb", "max_processes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"[sandbox] {name} must be >= 0 (0 = no limit), got {getattr(self, name)}")
        if self.memory_mb and self.memory_mb < 512:
            raise ConfigError(f"[sandbox] memory_mb = {self.memory_mb} is too small for the Python runtime and "
                              "the SDK (they need about 400 MiB of address space); use 512 or more")
        if self.max_processes and self.max_processes < 8:
            raise ConfigError(f"[sandbox] max_processes = {self.max_processes} is too small: the sandbox's own "
                              "interpreter uses several threads; use 8 or more (0 = no limit)")
        if not 0 < self.uid_base < 2**31 - self.uid_span:
            raise ConfigError(f"[sandbox] uid_base {self.uid_base} + uid_span {self.uid_span} must fit in 1..2^31")

    def uid_for(self, username: str) -> int:
        """A stable uid per user, so one user's sandboxes cannot signal or read another's."""
        digest = hashlib.blake2b(username.encode(), digest_size=8).digest()
        return self.uid_base + int.from_bytes(digest, "big") % self.uid_span

    def scratch_dir(self, username: str, instance_id: str) -> Path:
        safe_user = hashlib.blake2b(username.encode(), digest_size=8).hexdigest()
        return self.scratch_root / safe_user / instance_id

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["scratch_root"] = str(self.scratch_root)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxPolicy:
        values = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        values["scratch_root"] = Path(values.get("scratch_root", cls().scratch_root))
        return cls(**values)
