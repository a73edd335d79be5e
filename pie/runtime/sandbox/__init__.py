"""Isolated mode: each inferlet instance runs in its own sandbox process.

The sandbox speaks the Host API to the runtime over a socketpair (msgpack frames, never pickle), so
inferlets run unmodified in either mode. What the sandbox may do is a `SandboxPolicy`; how each
limit is enforced, and how strongly, is in `pie.runtime.sandbox.guard`.
"""

from __future__ import annotations

from pie.runtime.sandbox.policy import SandboxPolicy
from pie.runtime.sandbox.server import run_isolated

__all__ = ["SandboxPolicy", "run_isolated"]
