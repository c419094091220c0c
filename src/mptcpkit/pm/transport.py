"""A small blocking generic-netlink socket: family lookup, requests, multicast.

pyroute2 0.9's GenericNetlinkSocket runs an asyncio loop of its own behind every
call and opens namespaced sockets by forking; a path manager wants one plain
socket it can select on, created in the target namespace by `setns` (see
`mptcpkit.pm.netns`). Message encoding and decoding stay pyroute2's (`Marshal`,
`genlmsg`, `ctrlmsg`).
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
from collections.abc import Iterator
from typing import Any

from pyroute2.netlink import (
    CTRL_CMD_GETFAMILY,
    GENL_ID_CTRL,
    NETLINK_ADD_MEMBERSHIP,
    NETLINK_EXT_ACK,
    NETLINK_GENERIC,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SOL_NETLINK,
    ctrlmsg,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.marshal import Marshal

from mptcpkit.pm import netns as _netns

RCVBUF = 1 << 20  # events come in bursts (one per subflow): room for thousands
RECV_SIZE = 1 << 16  # a dump reply datagram never exceeds this
_seq = itertools.count(1)


class PMError(OSError):
    """A path-manager request failed; `errno` is the kernel's, the text says what was asked."""


class FamilyNotFound(PMError):
    """The kernel has no `mptcp_pm` generic-netlink family (MPTCP not built in)."""


class GenlSocket:
    """One NETLINK_GENERIC socket bound to a family, optionally in another netns."""

    def __init__(
        self,
        family_name: str,
        msg_class: type[Any],
        *,
        netns: str | None = None,
        nonblocking: bool = False,
    ) -> None:
        self.netns = netns
        self.family_name = family_name
        self._sock = _netns.create_socket(
            netns, socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC
        )
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            self._sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            self._sock.bind((0, 0))
            self.marshal = Marshal()
            self.marshal.msg_map[GENL_ID_CTRL] = ctrlmsg
            self.family_id, self.groups = self._resolve(family_name)
            self.marshal.msg_map[self.family_id] = msg_class
            if nonblocking:
                self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise

    # -- plumbing

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> GenlSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _resolve(self, name: str) -> tuple[int, dict[str, int]]:
        msg = ctrlmsg()
        msg["cmd"] = CTRL_CMD_GETFAMILY
        msg["version"] = 1
        msg["attrs"].append(("CTRL_ATTR_FAMILY_NAME", name))
        try:
            (reply,) = self._transact(msg, GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK)
        except PMError as exc:
            if exc.errno == errno.ENOENT:
                raise FamilyNotFound(
                    errno.ENOENT,
                    f"the kernel has no generic netlink family {name!r} "
                    "(MPTCP not built in or too old)",
                ) from None
            raise
        family_id = reply.get_attr("CTRL_ATTR_FAMILY_ID")
        groups = {
            g.get_attr("CTRL_ATTR_MCAST_GRP_NAME"): g.get_attr("CTRL_ATTR_MCAST_GRP_ID")
            for g in reply.get_attr("CTRL_ATTR_MCAST_GROUPS", [])
        }
        return int(family_id), groups

    def subscribe(self, group: str) -> None:
        self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, self.groups[group])

    # -- requests

    def request(self, msg: Any, *, dump: bool = False, what: str = "") -> list[Any]:
        """Send `msg` to the family; return the replies (a dump's entries)."""
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_DUMP if dump else 0)
        return self._transact(msg, self.family_id, flags, what=what)

    def _transact(self, msg: Any, mtype: int, flags: int, *, what: str = "") -> list[Any]:
        seq = next(_seq)
        msg["header"]["type"] = mtype
        msg["header"]["flags"] = flags
        msg["header"]["sequence_number"] = seq
        msg["header"]["pid"] = 0
        msg.encode()
        self._sock.send(msg.data)
        replies: list[Any] = []
        while True:
            data = self._sock.recv(RECV_SIZE)
            for reply in self.marshal.parse(data):
                header = reply["header"]
                if header["sequence_number"] != seq:
                    continue  # a stray multicast or an old reply
                error = header.get("error")
                if header["type"] in (NLMSG_ERROR, NLMSG_DONE):
                    if error is not None:
                        raise _pm_error(error, what)
                    return replies
                if error is not None:
                    raise _pm_error(error, what)
                replies.append(reply)

    # -- multicast

    def recv_messages(self) -> Iterator[Any]:
        """Messages of one datagram; BlockingIOError when nothing waits (non-blocking)."""
        data = self._sock.recv(RECV_SIZE)
        messages: Iterator[Any] = self.marshal.parse(data)
        return messages


def _pm_error(error: BaseException, what: str) -> PMError:
    code = getattr(error, "code", None) or getattr(error, "errno", None) or errno.EIO
    text = os.strerror(code)
    if isinstance(error, NetlinkError) and error.args[1:] and error.args[1] != text:
        text = f"{text} (kernel says: {error.args[1]})"
    return PMError(code, f"{what}: {text}" if what else text)
