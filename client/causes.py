"""One line per cause the hospital's daemon (and ``client check --dial``) can name, saying what to do.

What the lines name is the hospital as its config writes it (:class:`Identity`); the
Fleet error codes are the ones Flower 1.41's SuperLink answers with (tests pin them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FLEET_NODE_ACTIVATION_FAILED = 2004  # flwr.supercore.error.ApiErrorCode (tests check the pin)
FLEET_INVALID_HEARTBEAT_INTERVAL = 2003


@dataclass(frozen=True)
class Identity:
    """What the messages name: this hospital as its config writes it."""

    hospital: str
    address: str
    ca: str  # `coordinator.ca` as written
    node_key: str  # `keys.node_key` as written
    fingerprint: str  # of the node key, SHA256:...

    @property
    def node_pub(self) -> str:
        return str(Path(self.node_key).with_suffix(".pub"))

    @property
    def keys_dir(self) -> str:
        return str(Path(self.node_key).parent)


def not_registered(who: Identity) -> str:
    return (
        f"the coordinator at {who.address} does not know this node key ({who.fingerprint}): send "
        f"{who.node_pub} to the coordinator for `fedtune server add-hospital --name {who.hospital}`, then start again"
    )


def removed(who: Identity, node_id: int | None) -> str:
    node = f", node {node_id}" if node_id else ""
    return (
        f"the coordinator at {who.address} no longer accepts this node key ({who.fingerprint}{node}), which it had "
        "admitted; ask the coordinator why. To come back: `fedtune pki hospital --name "
        f"{who.hospital} --out {who.keys_dir} --rotate-node-key`, then send {who.node_pub} to the coordinator for "
        "`fedtune server add-hospital`"
    )


def clock_skew(who: Identity, ahead: float) -> str:
    side = f"{ahead:.0f} s ahead of" if ahead > 0 else f"{-ahead:.0f} s behind"
    return (
        f"this machine's clock is {side} the coordinator's at {who.address}, and the coordinator refuses node "
        "signatures dated more than 5 s ahead or 300 s behind its own time: set the clock (NTP), then start again"
    )


def tls_mismatch(error: str, *, address: str, ca: str) -> str:
    """One line for a certificate the hospital cannot accept, from the TLS error's text."""
    low = error.lower()
    host = address.rpartition(":")[0].strip("[]")
    reason = re.search(r"certificate verify failed: ([^(]+?)\s*(?:\(_ssl|$)", error)
    why = reason.group(1).rstrip(".") if reason else error
    if "hostname mismatch" in low or "ip address mismatch" in low:
        return (
            f"TLS mismatch: the coordinator's certificate does not name {host} ({why}): set `coordinator.address` "
            "to a name or address its certificate lists, or ask the coordinator to add this one "
            "(`fedtune pki server --address`)"
        )
    if "expired" in low or "not yet valid" in low:
        return f"TLS mismatch: the coordinator's certificate at {address} is not valid now ({why}): ask it to renew it"
    if "wrong_version_number" in low or "record layer failure" in low or "packet length too long" in low:
        return f"TLS mismatch: {address} does not speak TLS: check the port in `coordinator.address`"
    return (
        f"TLS mismatch: the coordinator's certificate at {address} does not verify with `coordinator.ca` ({ca}): "
        f"{why}; use the federation's ca.pem from the coordinator (the CA that signed its certificate)"
    )


def is_tls(fact: dict[str, Any]) -> bool:
    low = str(fact.get("error", "")).lower()
    return bool(fact.get("transport")) and any(w in low for w in ("certificate", "ssl", "tls"))
