"""``fedtune client check --dial``: reach the coordinator as the daemon would, and name what fails.

Three steps, each the daemon's own: a TCP connection to ``coordinator.address``; the TLS
handshake with ``coordinator.ca`` as the only trusted root and the address's host as the
name the certificate must carry (what Flower's HTTP client checks); then one Fleet call
signed with the node key through Flower's own Fleet client and SuperNode authentication
headers. The call is ``ActivateNode`` with a heartbeat interval the coordinator refuses
(0 s): Flower 1.41 looks the node key up first and checks the interval after, so an
admitted key gets "invalid heartbeat interval" (400) and an unknown one "failed to
activate" (412), and nothing is activated either way: a running daemon of the same
hospital is not disturbed, and the coordinator's status does not change.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune.client.causes import (
    FLEET_INVALID_HEARTBEAT_INTERVAL,
    FLEET_NODE_ACTIVATION_FAILED,
    Identity,
    clock_skew,
    not_registered,
    tls_mismatch,
)
from fedtune.client.health import Memory
from fedtune.client.hospital import HospitalConfig
from fedtune.config import parse_address
from fedtune.errors import FedTuneError

if TYPE_CHECKING:
    import httpx


class DialError(FedTuneError):
    """The hospital cannot reach its coordinator, or the coordinator refuses it; the message names the part."""


@dataclass(frozen=True)
class Dialled:
    address: str
    names: str  # what the coordinator's certificate was accepted for
    fingerprint: str


def dial(cfg: HospitalConfig, who: Identity, *, timeout: float = 10.0) -> Dialled:
    """Connect, verify TLS, make one signed Fleet call; raise ``DialError`` naming the part that fails."""
    address = cfg.coordinator.address
    host, port = parse_address(address, "coordinator.address")
    where = f"dial {address}"
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as err:
        raise DialError(
            f"{where}: unreachable: the name {host!r} does not resolve ({err.strerror}); check `coordinator.address`"
        ) from err
    except OSError as err:
        raise DialError(
            f"{where}: unreachable: {err.strerror or err} (TCP); check `coordinator.address`, that the coordinator "
            "runs (`fedtune server start`) and that the network lets this machine reach that port"
        ) from err
    context = ssl.create_default_context(cafile=str(cfg.path(cfg.coordinator.ca)))
    try:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.getpeercert()
    except ssl.SSLError as err:
        raise DialError(f"{where}: {tls_mismatch(str(err), address=address, ca=cfg.coordinator.ca)}") from err
    except OSError as err:
        raise DialError(
            f"{where}: unreachable: the TLS handshake failed ({err}); is it the coordinator's port?"
        ) from err
    finally:
        raw.close()
    _signed_call(cfg, who, where, timeout=timeout)
    return Dialled(address, host, who.fingerprint)


def _signed_call(cfg: HospitalConfig, who: Identity, where: str, *, timeout: float) -> None:
    import httpx
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, DeactivateNodeRequest
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    from fedtune.security import pki

    private = pki.load_node_private(cfg.path(cfg.keys.node_key))
    public = private.public_key()
    client = FleetHttpClient.from_server_address(
        cfg.coordinator.address,
        False,
        str(cfg.path(cfg.coordinator.ca)),
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="SuperNode"),
            NodeAuthHttpInterceptor(private, public),
        ],
    )
    request = ActivateNodeRequest(public_key=public_key_to_bytes(public), heartbeat_interval=0)
    with client:
        try:
            answer = client.ActivateNode(request)
        except httpx.HTTPStatusError as err:
            refusal = _refusal(cfg, who, where, err.response)
            if refusal is None:
                return  # admitted: the key was found, then the probe's interval refused
            raise refusal from err
        except httpx.HTTPError as err:
            raise DialError(f"{where}: Fleet call failed (TLS OK): {type(err).__name__}: {err}") from err
        # a coordinator that accepted the probe activated this node: leave it as it was
        client.DeactivateNode(DeactivateNodeRequest(node_id=answer.node_id))


def _refusal(cfg: HospitalConfig, who: Identity, where: str, response: httpx.Response) -> DialError | None:
    """What the coordinator's HTTP error answer to the probe says (None: the node key is admitted)."""
    import time
    from email.utils import parsedate_to_datetime

    from flwr.supercore.error import FlowerError

    error = FlowerError.from_json(response.text)
    code = error.code if error is not None else None
    if response.status_code == 400 and code == FLEET_INVALID_HEARTBEAT_INTERVAL:
        return None
    if response.status_code == 412 and code == FLEET_NODE_ACTIVATION_FAILED:
        known = Memory(cfg.state_dir / "connection.json").knows(who.fingerprint)
        before = f" (it was connected as node {known.get('node_id')} before: removed?)" if known else ""
        return DialError(f"{where}: node key not registered: {not_registered(who)}{before}")
    if response.status_code == 401:
        try:
            ahead = time.time() - parsedate_to_datetime(response.headers["date"]).timestamp()
        except (KeyError, TypeError, ValueError):
            ahead = 0.0
        if not -300 < ahead < 4:
            return DialError(f"{where}: clock skew: {clock_skew(who, ahead)}")
        return DialError(f"{where}: node key refused: the coordinator rejects this node's signature")
    if response.status_code in (502, 503, 504):
        return DialError(
            f"{where}: coordinator down: its front answers HTTP {response.status_code} (TLS OK): its "
            "SuperLink is not running; ask the coordinator"
        )
    if response.status_code == 404:
        return DialError(
            f"{where}: not a coordinator: TLS OK, but the server there has no Fleet API (HTTP 404): is it "
            "the coordinator's address and port?"
        )
    detail = error.message if error is not None else response.text[:200]
    return DialError(f"{where}: Fleet call failed (TLS OK): HTTP {response.status_code} {detail}")
