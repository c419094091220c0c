"""Path management for MPTCP: endpoints, limits, userspace-PM commands and events.

Everything works on a network namespace given by name (`netns="..."`, as in
`ip -n NAME mptcp ...`) or, by default, the calling thread's own.

    from mptcpkit import pm
    pm.add_endpoint("10.0.1.1", flags=["subflow"], dev="eth1", netns="client")
    with pm.events(netns="client") as stream:
        for event in stream:
            print(event)
"""

from __future__ import annotations

from mptcpkit.pm.api import (
    AsyncPathManager,
    PathManager,
    UnknownInterface,
    UserspacePMUnavailable,
    add_endpoint,
    announce,
    create_subflow,
    delete_endpoint,
    destroy_subflow,
    endpoints,
    flush_endpoints,
    limits,
    remove,
    set_endpoint_flags,
    set_limits,
)
from mptcpkit.pm.codec import Endpoint, EndpointFlag, Event, EventType, Limits
from mptcpkit.pm.events import EventStream, events
from mptcpkit.pm.netns import NamespaceNotFound
from mptcpkit.pm.transport import FamilyNotFound, PMError

__all__ = [
    "AsyncPathManager",
    "Endpoint",
    "EndpointFlag",
    "Event",
    "EventStream",
    "EventType",
    "FamilyNotFound",
    "Limits",
    "NamespaceNotFound",
    "PMError",
    "PathManager",
    "UnknownInterface",
    "UserspacePMUnavailable",
    "add_endpoint",
    "announce",
    "create_subflow",
    "delete_endpoint",
    "destroy_subflow",
    "endpoints",
    "events",
    "flush_endpoints",
    "limits",
    "remove",
    "set_endpoint_flags",
    "set_limits",
]
