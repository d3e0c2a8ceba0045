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


@dataclass(frozen=True)
class Lock:
    proxy_uid: int
    allow_dns: bool = False
    allow_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def nft(self) -> str:
        """The nftables ruleset: declared, deleted and declared again in one transaction (idempotent)."""
        rules = ['oifname "lo" accept', f"meta skuid {self.proxy_uid} accept", "ct state established,related accept"]
        if self.allow_dns:
            rules += ["udp dport 53 accept", "tcp dport 53 accept"]
        for net in self.allow_cidrs:
            rules.append(f"{'ip' if net.version == 4 else 'ip6'} daddr {net} accept")
        rules += ["meta l4proto tcp reject with tcp reset", "reject with icmpx type admin-prohibited"]
        body = "\n".join(f"        {r}" for r in rules)
        return (f"table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n"
                f"    chain output {{\n        type filter hook output priority 0; policy accept;\n{body}\n"
                "    }\n}\n")

    def iptables(self) -> list[list[str]]:
        """The same as iptables and ip6tables commands (their own chain, flushed and filled again)."""
        out = []
        for tool, version in (("iptables", 4), ("ip6tables", 6)):
            rules = [["-o", "lo", "-j", "ACCEPT"], ["-m", "owner", "--uid-owner", str(self.proxy_uid), "-j", "ACCEPT"],
                     ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]]
            if self.allow_dns:
                rules += [["-p", "udp", "--dport", "53", "-j", "ACCEPT"], ["-p", "tcp", "--dport", "53", "-j", "ACCEPT"]]
            rules += [["-d", str(n), "-j", "ACCEPT"] for n in self.allow_cidrs if n.version == version]
            rules += [["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"], ["-j", "REJECT"]]
            out += [[tool, "-N", CHAIN], [tool, "-F", CHAIN]] + [[tool, "-A", CHAIN, *r] for r in rules]
            out.append([tool, "-C", "OUTPUT", "-j", CHAIN, "||", tool, "-I", "OUTPUT", "1", "-j", CHAIN])
        return out


def parse_uid(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 2**32 - 1:
        raise ValueError(f"{text!r} must be a numeric user id above 0 (the proxy's, never root's)")
    return int(text)


def parse_cidrs(text: str | None) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for item in filter(None, (c.strip() for c in (text or "").split(","))):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not a CIDR like 10.0.0.0/8") from None
    return tuple(nets)


def tool() -> str:
    """nft, else iptables; LockError when there is neither."""
    for name in ("nft", "iptables"):
        if shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin"):
            return name
    raise LockError("neither nft nor iptables is installed (apt-get install nftables)")


def install(lock: Lock) -> str:
    """Install (or replace) the rules; which tool did it."""
    using = tool()
    if using == "nft":
        _run(["nft", "-f", "-"], lock.nft())
    else:
        for cmd in lock.iptables():
            if "||" in cmd:
                i = cmd.index("||")
                if subprocess.run(_bin(cmd[:i]), capture_output=True).returncode != 0:
                    _run(cmd[i + 1:])
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
