"""A raw pyzmq ROUTER echo server: the reference point for corral's round trips.

``python bench/zmq_echo.py ENDPOINT`` binds a ROUTER to ENDPOINT and sends
every message straight back to its sender until it gets SIGTERM. No decoding,
no logging, no durability: the fastest a Python ROUTER can answer a DEALER.
"""

from __future__ import annotations

import sys

import zmq


def serve(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    while True:
        sock.send_multipart(sock.recv_multipart())


if __name__ == "__main__":
    serve(sys.argv[1])
