"""The box codec, compiled or pure Python: the same bytes and the same boxes."""

from __future__ import annotations

import os
import subprocess
import sys

import asyncio_amp

BOX = {b"_ask": b"1", b"_command": b"Sum", b"a": b"13", b"b": b"81"}

# The same box in a fresh interpreter with the accelerator turned off.
CHILD = """
import asyncio_amp
data = asyncio_amp.encode_box({b"_ask": b"1", b"_command": b"Sum", b"a": b"13", b"b": b"81"})
print(asyncio_amp.ACCELERATED, data.hex(), asyncio_amp.parse_boxes(data))
"""


def main() -> None:
    data = asyncio_amp.encode_box(BOX)
    assert asyncio_amp.parse_boxes(data) == [BOX]
    env = {**os.environ, "ASYNCIO_AMP_NO_EXTENSIONS": "1"}
    child = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
    )
    accelerated, hex_data, boxes = child.stdout.split(" ", 2)
    print("pure Python in the child:", accelerated == "False")
    print("same bytes:", hex_data == data.hex())
    print("boxes:", boxes.strip())


if __name__ == "__main__":
    main()
