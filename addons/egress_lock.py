"""`sealgate egress-lock`: only the proxy's user may open connections that leave the network namespace.

In a pod every container shares one network namespace, so a NetworkPolicy cannot tell the sidecar
from the worker: a worker that ignores HTTPS_PROXY would reach the internet with no proxy at all. An
init container (with NET_ADMIN, and nothing else) runs this once: packets leaving through any
interface but loopback are accepted only from sockets owned by the proxy's uid, replies to
connections made to the pod, and (if asked) DNS and given CIDRs; everything else is rejected at
once, so a worker sees "connection refused", not a hang. The rules live in a table of their own
(nftables; iptables where nft is missing), replaced whole each time: running it twice is running
it once.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from dataclasses import dataclass

TABLE = "sealgate_egress"  # nftables table (inet: IPv4 and IPv6)
CHAIN = "SEALGATE_EGRESS"  # iptables chain, jumped to from OUTPUT


class LockError(Exception):
    """The rules cannot be installed or removed here; says why."""


Net = ipaddress.IPv4Network | ipaddress.IPv6Network
ND = ("nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-solicit", "nd-router-advert")  # IPv6 needs these
ND_IPTABLES = ("neighbour-solicitation", "neighbour-advertisement", "router-solicitation", "router-advertisement")


@dataclass(frozen=True)
class Lock:
    proxy_uid: int
    dns_servers: tuple[Net, ...] = ()  # port 53 of these (the resolvers), for every process
    allow_cidrs: tuple[Net, ...] = ()

    def nft(self) -> str:
        """The nftables ruleset: declared, deleted and declared again in one transaction (idempotent).
        Established traffic of other processes is accepted only in the reply direction: a worker that
        reuses the 5-tuple of a UDP flow the proxy left behind is sending in the original direction."""
        rules = ['oifname "lo" accept', f"meta skuid {self.proxy_uid} accept",
                 "ct direction reply ct state established,related accept",
                 f"icmpv6 type {{ {', '.join(ND)} }} accept"]
        for net in self.dns_servers:
            rules += [f"{_family(net)} daddr {net} {proto} dport 53 accept" for proto in ("udp", "tcp")]
        for net in self.allow_cidrs:
            rules.append(f"{_family(net)} daddr {net} accept")
        rules += ["meta l4proto tcp reject with tcp reset", "reject with icmpx type admin-prohibited"]
        body = "\n".join(f"        {r}" for r in rules)
        return (f"table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n"
                f"    chain output {{\n        type filter hook output priority 0; policy accept;\n{body}\n"
                "    }\n}\n")

    def iptables(self) -> list[list[str]]:
        """The same as iptables and ip6tables commands. A new chain is filled whole, jumped to first, and only
        then is the old one taken out and the new one renamed: a second run never leaves a moment unlocked."""
        out = []
        for tool, version in (("iptables", 4), ("ip6tables", 6)):
            rules = [["-o", "lo", "-j", "ACCEPT"], ["-m", "owner", "--uid-owner", str(self.proxy_uid), "-j", "ACCEPT"],
                     ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "--ctdir", "REPLY", "-j", "ACCEPT"]]
            if version == 6:
                rules += [["-p", "ipv6-icmp", "--icmpv6-type", t, "-j", "ACCEPT"] for t in ND_IPTABLES]
            for net in (n for n in self.dns_servers if n.version == version):
                rules += [["-d", str(net), "-p", proto, "--dport", "53", "-j", "ACCEPT"] for proto in ("udp", "tcp")]
            rules += [["-d", str(n), "-j", "ACCEPT"] for n in self.allow_cidrs if n.version == version]
            rules += [["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"], ["-j", "REJECT"]]
            new = CHAIN + "_NEW"
            out += [[tool, "-N", new], [tool, "-F", new]] + [[tool, "-A", new, *r] for r in rules]
            out += [[tool, "-I", "OUTPUT", "1", "-j", new], [tool, "-D", "OUTPUT", "-j", CHAIN, "?"],
                    [tool, "-F", CHAIN, "?"], [tool, "-X", CHAIN, "?"], [tool, "-E", new, CHAIN]]
        return out


def parse_uid(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 2**32 - 1:
        raise ValueError(f"{text!r} must be a numeric user id above 0 (the proxy's, never root's)")
    return int(text)


def _family(net: Net) -> str:
    return "ip" if net.version == 4 else "ip6"


def resolvers(path: str = "/etc/resolv.conf") -> tuple[Net, ...]:
    """The nameservers this namespace resolves with: --allow-dns opens port 53 to these, not to every host."""
    try:
        lines = open(path).read().splitlines()  # noqa: SIM115 - one small file
    except OSError as e:
        raise LockError(f"--allow-dns: {path} cannot be read ({e.strerror}); name the servers with --dns-server")
    found = parse_cidrs(",".join(line.split()[1] for line in lines if line.startswith("nameserver ") and
                                 len(line.split()) > 1 and "%" not in line.split()[1]))
    if not found:
        raise LockError(f"--allow-dns: {path} names no nameserver; name the servers with --dns-server")
    return found


def parse_cidrs(text: str | None) -> tuple[Net, ...]:
    nets = []
    for item in filter(None, (c.strip() for c in (text or "").split(","))):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not a CIDR like 10.0.0.0/8") from None
    return tuple(nets)


def tool() -> str:
    """nft, else iptables with ip6tables (both: IPv6 must not stay open); LockError when there is neither."""
    def found(name: str) -> bool:
        return bool(shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin"))
    if found("nft"):
        return "nft"
    if found("iptables") and found("ip6tables"):
        return "iptables"
    raise LockError("neither nft nor iptables with ip6tables is installed (apt-get install nftables)")


def install(lock: Lock) -> str:
    """Install (or replace) the rules; which tool did it."""
    using = tool()
    if using == "nft":
        _run(["nft", "-f", "-"], lock.nft())
    else:
        for cmd in lock.iptables():
            if cmd[-1] == "?":  # what may not be there (a first run has no old chain)
                subprocess.run(_bin(cmd[:-1]), capture_output=True)
            else:
                _run(cmd, ok_codes=(0, 1) if cmd[1] == "-N" else (0,))
    return using


def remove() -> str:
    using = tool()
    if using == "nft":
        listed = subprocess.run(_bin(["nft", "list", "tables"]), capture_output=True, text=True)
        if f"inet {TABLE}" in listed.stdout:
            _run(["nft", "delete", "table", "inet", TABLE])
    else:
        for t in ("iptables", "ip6tables"):
            subprocess.run(_bin([t, "-D", "OUTPUT", "-j", CHAIN]), capture_output=True)
            subprocess.run(_bin([t, "-F", CHAIN]), capture_output=True)
            subprocess.run(_bin([t, "-X", CHAIN]), capture_output=True)
    return using


def _bin(cmd: list[str]) -> list[str]:
    return [shutil.which(cmd[0]) or shutil.which(cmd[0], path="/usr/sbin:/sbin") or cmd[0], *cmd[1:]]


def _run(cmd: list[str], stdin: str | None = None, ok_codes: tuple[int, ...] = (0,)) -> None:
    done = subprocess.run(_bin(cmd), input=stdin, capture_output=True, text=True)
    if done.returncode not in ok_codes:
        err = (done.stderr.strip().splitlines() or [""])[-1]
        if "Operation not permitted" in done.stderr or "Permission denied" in done.stderr:
            raise LockError(f"{cmd[0]} was refused ({err}): egress-lock needs CAP_NET_ADMIN (run it as root, or "
                            "in an init container with the NET_ADMIN capability)")
        raise LockError(f"{' '.join(cmd[:3])} failed: {err}")
