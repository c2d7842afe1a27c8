"""A hand-made client of the sdexec server, for tests that play a hostile or broken caller.

``python raw_client.py [--no-fds] [--timeout S]`` reads the request bytes from stdin, sends
them on the server's socket (with /dev/null as the three stdio fds unless --no-fds), and
prints every line the server answers, then ``EOF`` (or ``RESET``) when the connection ends.
It runs as whoever the test runs it as (e.g. ``runuser -u guest``): the server must judge the
caller by SO_PEERCRED, whatever the bytes say.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

SOCKET = os.environ.get("SDEXEC_SOCKET", "/run/sdexec/sdexec.sock")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--no-fds", action="store_true")
    p.add_argument("--timeout", type=float, default=60)
    args = p.parse_args()
    data = sys.stdin.buffer.read()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(args.timeout)
    sock.connect(SOCKET)
    devnull = [os.open(os.devnull, os.O_RDWR) for _ in range(3)]
    try:
        if args.no_fds:
            sock.sendall(data)
        else:
            first, rest = data[:65536], data[65536:]
            socket.send_fds(sock, [first], devnull)
            if rest:
                sock.sendall(rest)
        buf = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                print("RESET", flush=True)
                return 0
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                print(line.decode(errors="replace"), flush=True)
        print("EOF", flush=True)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
