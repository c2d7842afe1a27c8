"""Keep N idle connections open to the sdexec server, as a hostile local user would.

Run as another user by the load tests: ``python3 - SOCKET N < this file`` is not used; the
test passes this file's text with ``python3 -c TEXT SOCKET N``. Opens N connections and
never sends a request; every connection the server answers or closes is counted by kind and
replaced by a new one, so N stay open (as far as the server lets them) until stdin closes.
Prints {"connected": N} once the first N were made, {"first_timeout": true} at the first
request-timeout answer, and at the end
{"answers": {kind: count}, "connect_errors": {...}}. Kinds: "busy" (refused at accept, the
per-user cap), "timeout" ([sdexec] request-timeout), "eof" (closed without a word), "other".
Replacements are paced (RECONNECTS_PER_S) so that the machine, not only the server, stays usable.
Stands alone (no sdexec import): the user it runs as may not read the checkout.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import selectors
import socket
import sys
import time

RECONNECTS_PER_S = 1000


def main() -> None:
    path, n = sys.argv[1], int(sys.argv[2])
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sel = selectors.DefaultSelector()
    errors: collections.Counter[str] = collections.Counter()
    answers: collections.Counter[str] = collections.Counter()
    bufs: dict[int, bytes] = {}

    def connect() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(path)
        except OSError as e:
            errors[type(e).__name__] += 1
            s.close()
            return
        s.setblocking(False)
        bufs[s.fileno()] = b""
        sel.register(s, selectors.EVENT_READ)

    for _ in range(n):
        connect()
    print(json.dumps({"connected": len(bufs)}), flush=True)
    sel.register(sys.stdin, selectors.EVENT_READ)
    done = False
    owed = 0  # connections to open again
    while not done:
        budget = RECONNECTS_PER_S // 100
        while owed and budget:
            connect()
            owed -= 1
            budget -= 1
        for key, _ in sel.select(timeout=0.01 if owed else None):
            if key.fileobj is sys.stdin:
                done = not os.read(key.fd, 1)
                continue
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            text = bufs[s.fileno()] + data
            if data and b"\n" not in text:
                bufs[s.fileno()] = text
                continue
            line = text.decode(errors="replace")
            if "busy" in line:
                answers["busy"] += 1
            elif "request-timeout" in line:
                answers["timeout"] += 1
                if answers["timeout"] == 1:
                    print(json.dumps({"first_timeout": True}), flush=True)
            elif line:
                answers["other: " + line.strip()[:200]] += 1
            else:
                answers["eof"] += 1
            del bufs[s.fileno()]
            sel.unregister(s)
            s.close()
            owed += 1
        if owed:
            time.sleep(0.01)
    print(json.dumps({"answers": dict(answers), "connect_errors": dict(errors)}), flush=True)


if __name__ == "__main__":
    main()
