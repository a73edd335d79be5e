"""Talking to the client that launched this instance.

`send` becomes the client's Message event (a str verbatim, anything else as
JSON); `send_file` a File event. `receive`/`receive_file` wait for the
client's `signal` / `transfer_file`. (`print` goes to the Stdout event.)
"""

from __future__ import annotations

import json
from typing import Any

from inferlet._host import get_host


def send(message: Any) -> None:
    get_host().send(message if isinstance(message, str) else json.dumps(message, default=str))


def send_file(data: bytes) -> None:
    get_host().send_file(bytes(data))


async def receive() -> str:
    return await get_host().receive()


async def receive_file() -> bytes:
    return await get_host().receive_file()
