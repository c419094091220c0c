"""Connect in a loop to the port named on stdin; report what each port's clients saw.

Reads a port per line; connects to it over and over (each connection expects one byte
b"k" from the server, then EOF) until the next line arrives, which it acknowledges
with "ok". "end" prints {port: {outcome: count}} as JSON and exits. A run is bounded
by a deadline given as argv[1] (seconds).
"""

import json
import select
import socket
import sys
import time
from collections import Counter

deadline = time.monotonic() + float(sys.argv[1])
results: dict[int, Counter[str]] = {}
port = None
while time.monotonic() < deadline:
    ready, _, _ = select.select([sys.stdin], [], [], 0 if port else 1)
    if ready:
        line = sys.stdin.readline().strip()
        if line in ("end", ""):
            break
        port = int(line)
        results[port] = Counter()
        print("ok", flush=True)
    if port is None:
        continue
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=8) as sock:
            data = sock.recv(1)
        results[port]["ok" if data == b"k" else f"short read {data!r}"] += 1
    except OSError as exc:
        results[port][type(exc).__name__ + " " + (exc.strerror or str(exc))] += 1
print(json.dumps({p: dict(c) for p, c in results.items()}), flush=True)
