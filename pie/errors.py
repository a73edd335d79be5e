"""Exceptions a user, a config or the environment can cause.

Each message says what was wrong, with the numbers, and what to do about it.
Internal invariants use `assert` instead.
"""

from __future__ import annotations


class PieError(Exception):
    """Base of every user-facing error."""


class ConfigError(PieError):
    """A configuration value is missing, mistyped or impossible."""


class ModelNotFoundError(PieError):
    """A model id or path could not be resolved to a local checkpoint."""


class CheckpointError(PieError):
    """A checkpoint's files do not match the architecture (missing/unexpected/mis-shaped tensors)."""


class UnsupportedModelError(PieError):
    """The checkpoint's `model_type` has no implementation in this engine."""


class BatchError(PieError):
    """A forward batch is malformed or over a configured limit; the engine stays usable."""


class OutOfPagesError(PieError):
    """The KV page pool cannot satisfy a request."""


class ProtocolError(PieError):
    """A client/server frame is malformed, oversized or of an unknown type."""


class AuthError(PieError):
    """Authentication was refused (unknown user or key, bad signature, bad token)."""


class RequestError(PieError):
    """The server refused a client request (unknown inferlet, bad arguments, not permitted, ...)."""


class InputError(PieError):
    """A request's data cannot be decoded: not JSON, nested too deep, a lone surrogate, NaN (a 400)."""


class ChatTemplateError(PieError):
    """A model's chat template does not compile or refuses a conversation."""


class ProgramError(PieError):
    """An inferlet package is missing, malformed, or names an entry point that does not exist."""


class AdapterError(PieError):
    """A LoRA adapter cannot be loaded (bad files, unsupported options, over a slot or rank limit)."""


class MessagingError(PieError):
    """A messaging call was refused (queue full, unknown subscription)."""


class FlavorError(PieError):
    """A flavor file (flavors/*.toml) or an installation's recorded flavor is missing or inconsistent."""


class InferletError(PieError):
    """An inferlet's own code raised; the message carries its traceback (the program's frames only)."""


class SandboxError(PieError):
    """A sandboxed inferlet's process died, broke the protocol, or could not be started."""


class EngineWorkerError(PieError):
    """An engine worker process (tensor-parallel rank) failed to start, died, or hit an unrecoverable error."""
