"""Egress policy: which dialled addresses the proxy may connect to (pure).

Only globally routable unicast addresses are reachable by default: loopback, private,
link-local (cloud metadata), CGNAT, multicast and reserved ranges are refused, with
IPv4-mapped and NAT64-wrapped IPv4 unwrapped first. `allow_private` CIDRs reopen
chosen ranges. The proxy's own ports on local addresses are never reachable.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def parse_cidrs(text: str) -> list[IPNetwork]:
    """'127.0.0.1/32, 10.0.0.0/8' -> networks; ValueError names the bad item."""
    nets: list[IPNetwork] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not a CIDR range (like 10.0.0.0/8 or 127.0.0.1/32)") from None
    return nets


def unwrap(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour:
            return ip.sixtofour
    return ip


@dataclass(frozen=True)
class EgressPolicy:
    allow_private: tuple[IPNetwork, ...] = ()
    own_ports: frozenset[int] = field(default_factory=frozenset)

    def refusal_reason(self, address: str, port: int) -> str | None:
        """None if the proxy may dial address:port, else why not."""
        try:
            ip = unwrap(ipaddress.ip_address(address.split("%", 1)[0]))
        except ValueError:
            return f"{address!r} is not an IP address"
        local = ip.is_loopback or ip.is_unspecified
        if port in self.own_ports and local:
            return f"{ip}:{port} is sealgate's own port"
        if any(ip in net for net in self.allow_private if net.version == ip.version):
            return None
        if ip.is_global and not ip.is_multicast:
            return None
        kind = (
            "loopback" if ip.is_loopback
            else "link-local (cloud metadata)" if ip.is_link_local
            else "private" if ip.is_private
            else "not globally routable"
        )
        return f"{ip} is {kind}; add its range to SEALGATE_ALLOW_PRIVATE to allow it"
