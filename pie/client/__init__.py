"""The async Python client for `pie serve` (see docs/client.md)."""

from pie.client.client import PieClient, Process, ProcessFailed

__all__ = ["PieClient", "Process", "ProcessFailed"]
