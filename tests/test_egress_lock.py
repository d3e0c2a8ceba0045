"""`sealgate egress-lock` for real: two network namespaces joined by a veth pair (made here, removed
after), a server in one, the rules applied in the other. A process running as a worker's uid cannot
reach the server, one running as the proxy's uid can, and the worker still reaches loopback. Only
addresses inside these namespaces are used (10.199.x.0/24)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from conftest import SEALGATE

PROXY_UID, WORKER_UID = 4242, 4343
UDP_ECHO = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 9999))\n"
            "while True:\n    data, peer = s.recvfrom(100); s.sendto(data, peer)")
UDP_FROM_PORT = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)\n"
                 "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('', 40000))\n"
                 "s.connect((sys.argv[1], 9999))\n"
                 "try:\n    s.send(b'x'); s.recv(10); print('out')\nexcept OSError:\n    print('blocked')")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done


@pytest.fixture
def namespaces():
    """(worker side, server side, server address): two namespaces and the veth pair between them."""
    if os.geteuid() != 0:
        pytest.fail("the egress-lock tests make network namespaces: run them as root (CI does)", pytrace=False)
    tag = f"{os.getpid() % 100000}"
    a, b, net = f"sgA{tag}", f"sgB{tag}", f"10.199.{os.getpid() % 250}"
    servers: list[subprocess.Popen] = []
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", f"va{tag}", "netns", a, "type", "veth", "peer", "name", f"vb{tag}", "netns", b)
        for ns, dev, addr in ((a, f"va{tag}", f"{net}.1/24"), (b, f"vb{tag}", f"{net}.2/24")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for ns, host, port in ((b, f"{net}.2", 8000), (a, "127.0.0.1", 8001), (b, f"{net}.2", 53)):
            servers.append(subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-m", "http.server", str(port),
                                             "--bind", host], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        servers.append(subprocess.Popen(["ip", "netns", "exec", b, "/usr/bin/python3", "-c", UDP_ECHO, f"{net}.2"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield a, b, f"{net}.2"
    finally:
        for s in servers:
            s.kill()
            s.wait()
        for ns in (a, b):
            sh("ip", "netns", "del", ns, check=False)


def fetch(ns: str, uid: int, url: str) -> int:
    """curl in ns as uid: its exit status (0: it got an answer; 7: refused)."""
    return sh("ip", "netns", "exec", ns, "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
              "curl", "-sS", "-o", "/dev/null", "--max-time", "5", url, check=False).returncode


def lock(ns: str, *args: str, net_admin: bool = True) -> subprocess.CompletedProcess:
    """egress-lock in ns (as root; without NET_ADMIN in its capability bounding set when net_admin is False)."""
    drop = [] if net_admin else ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"]
    return sh("ip", "netns", "exec", ns, *drop, str(SEALGATE), "egress-lock", *args, check=False)


@pytest.mark.e2e
def test_only_the_proxy_uid_leaves_the_namespace(namespaces):
    a, _, server = namespaces
    url, local = f"http://{server}:8000/", "http://127.0.0.1:8001/"
    deadline = time.time() + 10
    while fetch(a, WORKER_UID, url) != 0:  # the servers are up, and nothing is locked yet
        assert time.time() < deadline, "the test servers did not start"
        time.sleep(0.1)
    assert fetch(a, WORKER_UID, local) == 0
    r = lock(a, "--proxy-uid", str(PROXY_UID))
    assert r.returncode == 0 and "only uid 4242 leaves" in r.stdout, r.stderr
    started = time.monotonic()
    assert fetch(a, WORKER_UID, url) == 7  # refused, not left to hang
    assert time.monotonic() - started < 3
    assert fetch(a, PROXY_UID, url) == 0
    assert fetch(a, WORKER_UID, local) == 0  # the proxy on loopback stays reachable
    assert lock(a, "--proxy-uid", str(PROXY_UID)).returncode == 0  # idempotent: the same table, once
    tables = sh("ip", "netns", "exec", a, "nft", "list", "tables").stdout
    assert tables.count("sealgate_egress") == 1
    assert lock(a, "--proxy-uid", str(PROXY_UID), "--allow-cidr", f"{server}/32").returncode == 0
    assert fetch(a, WORKER_UID, url) == 0  # an allowed CIDR
    assert lock(a, "--remove").returncode == 0 and lock(a, "--remove").returncode == 0
    assert fetch(a, WORKER_UID, url) == 0 and "sealgate_egress" not in sh("ip", "netns", "exec", a, "nft",
                                                                          "list", "tables").stdout


@pytest.mark.e2e
def udp_from_40000(ns: str, uid: int, server: str) -> str:
    """A UDP exchange with the echo server from local port 40000, as uid: 'out' or 'blocked'."""
    return sh("ip", "netns", "exec", ns, "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
              "/usr/bin/python3", "-c", UDP_FROM_PORT, server, check=False).stdout.strip()


@pytest.mark.e2e
def test_dns_is_its_resolvers_only_and_a_flow_the_proxy_left_is_not_a_way_out(namespaces):
    """(red team, round 12) --allow-dns opened port 53 of every host (a tunnel); a worker reusing the 5-tuple
    of a UDP flow the proxy made matched 'established' and got out."""
    a, _, server = namespaces
    resolver = server.rsplit(".", 1)[0] + ".3"
    assert lock(a, "--proxy-uid", str(PROXY_UID), "--dns-server", resolver).returncode == 0
    assert fetch(a, WORKER_UID, f"http://{server}:53/") == 7  # port 53, but not of a resolver
    assert lock(a, "--proxy-uid", str(PROXY_UID), "--dns-server", server).returncode == 0
    assert fetch(a, WORKER_UID, f"http://{server}:53/") == 0  # the resolver's port 53
    assert lock(a, "--proxy-uid", str(PROXY_UID)).returncode == 0
    assert udp_from_40000(a, WORKER_UID, server) == "blocked"
    assert udp_from_40000(a, PROXY_UID, server) == "out"  # the proxy's flow: a conntrack entry
    assert udp_from_40000(a, WORKER_UID, server) == "blocked"  # the same 5-tuple, from the worker


@pytest.mark.e2e
def test_without_net_admin_it_says_so_in_one_line(namespaces):
    a, _, _ = namespaces
    r = lock(a, "--proxy-uid", str(PROXY_UID), net_admin=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "needs CAP_NET_ADMIN" in r.stderr, r.stderr


def test_dry_run_prints_the_rules_and_bad_input_is_one_line():
    r = sh(str(SEALGATE), "egress-lock", "--proxy-uid", "1000", "--dns-server", "10.96.0.10", "--allow-cidr",
           "10.96.0.0/12", "--dry-run")
    assert "meta skuid 1000 accept" in r.stdout and "ip daddr 10.96.0.10/32 udp dport 53 accept" in r.stdout
    assert "ct direction reply ct state established,related accept" in r.stdout
    assert "ip daddr 10.96.0.0/12 accept" in r.stdout and r.stdout.startswith("table inet sealgate_egress\n")
    for args, says in ((("--proxy-uid", "0"), "--proxy-uid: '0' must be a numeric user id above 0"),
                       (("--proxy-uid", "root"), "--proxy-uid: 'root' must be a numeric user id"),
                       (("--proxy-uid", "7", "--allow-cidr", "nope"), "--allow-cidr: 'nope' is not a CIDR")):
        r = sh(str(SEALGATE), "egress-lock", *args, "--dry-run", check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith(f"sealgate: error: {says}")


def test_the_iptables_form_says_the_same():
    from sealgate import egress_lock
    lock = egress_lock.Lock(1000, egress_lock.parse_cidrs("10.9.9.9"), egress_lock.parse_cidrs("10.0.0.0/8,fd00::/8"))
    cmds = [" ".join(c) for c in lock.iptables()]
    assert "iptables -A SEALGATE_EGRESS_NEW -m owner --uid-owner 1000 -j ACCEPT" in cmds
    assert "iptables -A SEALGATE_EGRESS_NEW -m conntrack --ctstate ESTABLISHED,RELATED --ctdir REPLY -j ACCEPT" in cmds
    assert "iptables -A SEALGATE_EGRESS_NEW -d 10.9.9.9/32 -p udp --dport 53 -j ACCEPT" in cmds
    assert "ip6tables -A SEALGATE_EGRESS_NEW -p ipv6-icmp --icmpv6-type neighbour-solicitation -j ACCEPT" in cmds
    assert "ip6tables -A SEALGATE_EGRESS_NEW -d fd00::/8 -j ACCEPT" in cmds
    assert not any("ip6tables" in c and "10.0.0.0/8" in c for c in cmds)
    # the new chain is jumped to before the old one goes: a second run is never unlocked for a moment
    v4 = [c for c in cmds if c.startswith("iptables ")]
    assert v4.index("iptables -I OUTPUT 1 -j SEALGATE_EGRESS_NEW") < v4.index("iptables -D OUTPUT -j SEALGATE_EGRESS ?")
    assert v4[-1] == "iptables -E SEALGATE_EGRESS_NEW SEALGATE_EGRESS"
