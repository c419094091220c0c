"""What the engine keeps per connection (issue 12: idle memory per connection <= 0.1x HAProxy).

An idle proxied connection costs the engine one `struct Conn` (benchmarks/proxy_bench.py's
idle row measures the whole process against HAProxy). A converter's state (RFC 8803: the
client's destination, the remote gateway's reply) lives apart, made only by the
connections that need it, and the addresses kept are IP-sized: a plain frontend's
connection does not carry them.
"""

from __future__ import annotations

import pytest

from mptcpkit.proxy import compiled

engine = compiled._engine

pytestmark = pytest.mark.skipif(engine is None, reason="the engine is not built")

# 424 bytes: one 432-byte malloc chunk (glibc: size + 8, rounded up to 16). It was 696
# when converter and routing state (a 128-byte sockaddr_storage each for the client and
# the destination) sat in every connection: 0.16x HAProxy's idle memory, over the target.
CONN_LIMIT = 424


def test_an_idle_connection_costs_the_engine_one_small_struct() -> None:
    assert engine.CONN_BYTES <= CONN_LIMIT, (
        f"struct Conn is {engine.CONN_BYTES} bytes, over {CONN_LIMIT}: state that only some "
        "connections need belongs in a struct of its own (as Conv), made when needed"
    )
