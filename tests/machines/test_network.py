"""A network namespace per machine (`skyreg.machines.network`), on the real kernel.

Every test uses its own short prefix for names (`t` + 4 random characters), a 10.x.0.0/16 that
no host route touches, and its own iptables chains; a fixture removes all of it, failure or
not, and then checks that nothing with the prefix is left (namespaces, links, chains).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from skyreg.machines.network import Attachment, HostNetwork, NetworkError, enter_command
from skyreg.machines.runtime import ImageConfig, UserIds, start_machine
from tests.support.images import BUSYBOX
from tests.support.netns import free_subnet, fresh_prefix, host_routes, leftovers, network_problem

PORT = 8080


_WHY = network_problem()
needs_netns = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


class Host:
    """One test's world: its prefix, its HostNetwork(s), its processes, its extra cleanups."""

    def __init__(self) -> None:
        self.prefix = fresh_prefix("t")
        self.taken: list[IPv4Network] = []
        self.subnet = free_subnet(16, self.taken)
        self.nets: list[HostNetwork] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cleanups: list[Callable[[], object]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="skyreg-net-"))

    def network(self, **kw: object) -> HostNetwork:
        net = HostNetwork(self.prefix, self.subnet, **kw)  # type: ignore[arg-type]
        self.nets.append(net)
        net.ensure()
        return net

    def machine(self, att: Attachment, marker: str) -> None:
        """A machine-like bwrap process in `att`'s namespace: busybox httpd serving `marker`."""
        www = self.tmp / att.machine_id
        www.mkdir()
        (www / "index.html").write_text(marker)
        argv = [
            *enter_command(att),
            "bwrap",
            "--ro-bind", str(BUSYBOX), "/bin/busybox",
            "--ro-bind", str(www), "/www",
            "--proc", "/proc", "--dev", "/dev",
            "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--die-with-parent", "--new-session", "--as-pid-1",
            "--", "/bin/busybox", "httpd", "-f", "-p", str(PORT), "-h", "/www",
        ]  # fmt: skip
        self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while _get(att.address) != marker:
            assert time.monotonic() < deadline, f"{att.machine_id} never answered"
            time.sleep(0.1)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        for cleanup in reversed(self.cleanups):
            cleanup()
        for net in self.nets:
            net.teardown()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def host() -> Iterator[Host]:
    h = Host()
    try:
        yield h
    finally:
        h.close()
    assert leftovers(h.prefix) == []


def _get(address: IPv4Address, port: int = PORT) -> str | None:
    """The body of http://address:port/ fetched from the host, or None."""
    try:
        with socket.create_connection((str(address), port), timeout=1) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return None
    return data.partition(b"\r\n\r\n")[2].decode()


_CLIENT = """
import errno, socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
    print("ok")
except socket.timeout:
    print("timeout")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)))
"""


def _connect_from(att: Attachment, address: IPv4Address, port: int = PORT) -> str:
    """Connect from inside `att`'s namespace: "ok", "timeout" or the errno's name."""
    argv = [*enter_command(att), sys.executable, "-c", _CLIENT, str(address), str(port)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()


def _in_netns(att: Attachment, *cmd: str) -> str:
    return subprocess.run(
        [*enter_command(att), *cmd], capture_output=True, text=True, check=True
    ).stdout


# --------------------------------------------------------------------------- no root needed


@pytest.mark.parametrize(
    "bad", ["a;rm -rf /", "../x", "", "-x", ".x", "a b", "a/b", "a\nb", "x" * 65, "é"]
)
def test_hostile_ids_are_refused_before_anything_runs(bad: str) -> None:
    net = HostNetwork("zz", IPv4Network("10.251.0.0/16"))
    with pytest.raises(NetworkError, match="invalid"):
        net.attach(bad, "org")
    with pytest.raises(NetworkError, match="invalid"):
        net.attach("m1", bad)
    with pytest.raises(NetworkError, match="invalid"):
        net.netns_path(bad)
    with pytest.raises(NetworkError, match="invalid"):
        net.detach(bad)


@pytest.mark.parametrize("bad", ["", "Ab", "1a", "toolong", "a-b", "a;b"])
def test_bad_prefix_is_refused(bad: str) -> None:
    with pytest.raises(NetworkError, match="prefix"):
        HostNetwork(bad, IPv4Network("10.251.0.0/16"))


def test_public_or_too_small_subnets_are_refused() -> None:
    with pytest.raises(NetworkError):
        HostNetwork("zz", IPv4Network("8.8.0.0/16"))
    with pytest.raises(NetworkError):
        HostNetwork("zz", IPv4Network("10.251.0.0/25"), block_prefix=24)


def test_interface_names_fit_and_differ() -> None:
    net = HostNetwork("abcde", IPv4Network("10.251.0.0/16"))
    long_id = "m" * 64
    names = {net.veth_name(long_id), net.veth_name("m1"), net.bridge_name(long_id)}
    assert len(names) == 3
    assert all(len(n) <= 15 for n in names)
    assert net.netns_path("m1") == Path("/run/netns/abcde-m1")


def test_enter_command_drops_to_the_machine_user_after_joining() -> None:
    att = Attachment(
        "m1", "o", Path("/run/netns/zz-m1"), IPv4Address("10.0.0.2"), IPv4Network("10.0.0.0/24"),
        IPv4Address("10.0.0.1"),
    )  # fmt: skip
    assert enter_command(att) == ["nsenter", "--net=/run/netns/zz-m1", "--"]
    user = enter_command(att, user=(1000, 1000, [1000, 1001]))
    assert user[:3] == ["nsenter", "--net=/run/netns/zz-m1", "--"]
    assert user[3:] == ["setpriv", "--reuid=1000", "--regid=1000", "--groups=1000,1001", "--"]


# --------------------------------------------------------------------------- the kernel


@needs_netns
def test_attach_gives_lo_address_and_route_and_detach_removes_all(host: Host) -> None:
    net = host.network()
    a1, a2, b1 = net.attach("a1", "orga"), net.attach("a2", "orga"), net.attach("b1", "orgb")
    addresses = {a1.address, a2.address, b1.address}
    assert len(addresses) == 3 and all(a in host.subnet for a in addresses)
    assert a1.network == a2.network != b1.network
    assert a1.gateway == a1.network.network_address + 1 not in addresses
    assert net.attach("a1", "orga") == a1  # idempotent
    with pytest.raises(NetworkError, match="another org"):
        net.attach("a1", "orgb")
    assert a1.netns_path.exists()
    links = json.loads(_in_netns(a1, "ip", "-j", "addr", "show"))
    by_name = {link["ifname"]: link for link in links}
    assert set(by_name) == {"lo", "eth0"}
    assert "UP" in by_name["lo"]["flags"] and "UP" in by_name["eth0"]["flags"]
    inet = [i["local"] for i in by_name["eth0"]["addr_info"] if i["family"] == "inet"]
    assert inet == [str(a1.address)]
    assert f"default via {a1.gateway} dev eth0" in _in_netns(a1, "ip", "route")

    net.detach("a1")
    net.detach("a1")  # twice is fine
    assert not a1.netns_path.exists()
    assert net.attachment("a1") is None
    assert (
        net.veth_name("a1")
        not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    )
    # the freed address is handed out again; org B's bridge goes with its last machine
    assert net.attach("a3", "orga").address == a1.address
    net.detach("b1")
    links_now = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert net.bridge_name("orgb") not in links_now and net.bridge_name("orga") in links_now


@needs_netns
def test_restart_readopts_and_never_reuses_an_address(host: Host) -> None:
    first = host.network()
    a1, b1 = first.attach("a1", "orga"), first.attach("b1", "orgb")
    first.ensure()  # idempotent: the chains are rewritten, hooked in once
    again = host.network()  # the agent restarted: a new object, state from the kernel
    assert again.attachment("a1") == a1 and again.attachment("b1") == b1
    a2 = again.attach("a2", "orga")
    c1 = again.attach("c1", "orgc")
    assert a2.address not in {a1.address, b1.address}
    assert c1.network not in {a1.network, b1.network}
    for table, hook in (("filter", "FORWARD"), ("nat", "POSTROUTING")):
        rules = subprocess.run(
            ["iptables", "-t", table, "-S", hook], capture_output=True, text=True
        )
        assert rules.stdout.count(f"-j {again.chain}") == 1


@needs_netns
def test_a_cap_on_machines(host: Host) -> None:
    net = host.network(max_machines=2)
    net.attach("m1", "o")
    net.attach("m2", "o")
    with pytest.raises(NetworkError, match="at most 2"):
        net.attach("m3", "o")
    assert not net.netns_path("m3").exists()


@needs_netns
def test_a_subnet_on_a_host_route_is_refused(host: Host) -> None:
    private = [r for r in host_routes() if r.is_private and 16 <= r.prefixlen <= 24]
    if not private:
        pytest.skip("no private host route to collide with")
    net = HostNetwork(host.prefix, private[0])
    with pytest.raises(NetworkError, match="overlaps"):
        net.ensure()


@needs_netns
def test_a_bwrap_machine_in_its_namespace_is_reached_from_the_host(host: Host) -> None:
    net = host.network()
    att = net.attach("web", "orga")
    host.machine(att, "hello from web")
    assert _get(att.address) == "hello from web"
    # the bwrap process lives in the machine's namespace, not the host's
    pid = host.procs[0].pid
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(att.netns_path).st_ino
    assert os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino


@needs_netns
def test_orgs_are_isolated_and_one_org_talks(host: Host) -> None:
    net = host.network()
    a1, a2, b1 = net.attach("a1", "orga"), net.attach("a2", "orga"), net.attach("b1", "orgb")
    for att in (a1, a2, b1):
        host.machine(att, f"hi {att.machine_id}")
        assert _get(att.address) == f"hi {att.machine_id}"  # the host reaches every org
    assert _connect_from(a2, a1.address) == "ok"
    assert _connect_from(a1, a2.address) == "ok"
    # b1 listens (the host just reached it): only the rule stands in the way
    assert _connect_from(a1, b1.address) == errno.errorcode[errno.EHOSTUNREACH]
    assert _connect_from(b1, a2.address) == errno.errorcode[errno.EHOSTUNREACH]


@needs_netns
def test_a_machine_reaches_no_service_on_its_host_and_the_host_reaches_it(host: Host) -> None:
    net = host.network()
    att = net.attach("m1", "orga")
    host.machine(att, "hi m1")  # the host connects to the machine (and its replies come back)
    with socket.create_server(("0.0.0.0", 0)) as server:
        port = server.getsockname()[1]
        # Listening on every address: the gateway's, and the host's own elsewhere.
        assert _connect_from(att, att.gateway, port) == errno.errorcode[errno.EHOSTUNREACH]
        others = [a for a in _host_addresses() if a not in att.network and not a.is_loopback]
        for other in others[:2]:
            assert _connect_from(att, other, port) == errno.errorcode[errno.EHOSTUNREACH]
    assert _get(att.address) == "hi m1"
    # A restart's ensure() rewrites the rules and hooks them in once.
    host.network()
    rules = subprocess.run(["iptables", "-S", "INPUT"], capture_output=True, text=True)
    assert rules.stdout.count(f"-j {net.input_chain}") == 1
    assert _connect_from(att, att.gateway, PORT) == errno.errorcode[errno.EHOSTUNREACH]
    assert _get(att.address) == "hi m1"


@needs_netns
def test_a_machine_reaches_no_service_on_its_host_over_ipv6(host: Host) -> None:
    net = host.network()
    att = net.attach("m1", "orga")
    bridge = net.bridge_name("orga")
    # The link-local address the kernel would give the bridge (EUI-64 of its MAC): with IPv6 on,
    # the host answered there on every socket bound to `::`, past the IPv4 rules.
    [link] = json.loads(
        subprocess.run(["ip", "-j", "link", "show", bridge], capture_output=True).stdout
    )
    octets = [int(x, 16) for x in link["address"].split(":")]
    octets[0] ^= 0x02
    eui = [*octets[:3], 0xFF, 0xFE, *octets[3:]]
    local = "fe80::" + ":".join(f"{eui[i] << 8 | eui[i + 1]:x}" for i in range(0, 8, 2))
    for ifname in (bridge, net.veth_name("m1")):
        shown = subprocess.run(
            ["ip", "-j", "-6", "addr", "show", "dev", ifname], capture_output=True
        )
        assert [a for x in json.loads(shown.stdout or b"[]") for a in x["addr_info"]] == [], ifname
    assert "inet6" not in _in_netns(att, "ip", "-6", "addr", "show", "dev", "eth0")
    with socket.create_server(("::", 0), family=socket.AF_INET6) as server:
        port = server.getsockname()[1]
        got = _connect_from(att, f"{local}%eth0", port)  # type: ignore[arg-type]
        assert got != "ok", got


def _rootfs(top: Path, marker: str) -> Path:
    """A busybox rootfs serving `marker` at /www, with root and app (1000) users."""
    rootfs = top / "rootfs"
    for d in ("bin", "etc", "www"):
        (rootfs / d).mkdir(parents=True)
    shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\napp:x:1000:1000::/:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nstaff:x:1001:app\n")
    (rootfs / "www" / "index.html").write_text(marker)
    for path in [top, *(p for p in rootfs.rglob("*"))]:
        path.chmod(0o755 if path.is_dir() or path.name == "busybox" else 0o644)
    return rootfs


def _ids(pid: int) -> tuple[int, int, list[int]]:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    groups = sorted(int(g) for g in status["Groups"].split())
    return int(status["Uid"].split()[0]), int(status["Gid"].split()[0]), groups


@needs_netns
@pytest.mark.parametrize("user", ["", "app"])
def test_start_machine_runs_bwrap_in_the_namespace_as_the_machine_user(
    host: Host, user: str
) -> None:
    net = host.network()
    att = net.attach("m1", "orga")
    top = Path(tempfile.mkdtemp(prefix="skyreg-netrt-"))
    host.cleanups.append(lambda: shutil.rmtree(top, ignore_errors=True))
    rootfs = _rootfs(top, f"hello as {user or 'root'}")
    cmd = ["/bin/busybox", "httpd", "-f", "-p", str(PORT), "-h", "/www"]
    conf = ImageConfig(cmd=tuple(cmd), user=user)
    entered: list[UserIds | None] = []

    def enter(ids: UserIds | None) -> list[str]:
        entered.append(ids)
        return enter_command(att, user=ids)

    machine = start_machine(rootfs, conf, log_path=top / "log", hostname="m1", enter=enter)
    host.cleanups.append(machine.stop)
    deadline = time.monotonic() + 10
    while _get(att.address) != f"hello as {user or 'root'}":
        assert machine.running, (top / "log").read_text()
        assert time.monotonic() < deadline, "the machine never answered at its address"
        time.sleep(0.1)
    want = (1000, 1000, [1000, 1001]) if user else (0, 0, [0])
    assert entered == [want]
    for pid in (machine.pid, machine.bwrap_pid):  # bwrap and PID 1, in the netns, as the user
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(att.netns_path).st_ino
        assert _ids(pid) == want
    machine.stop(2)


def _host_addresses() -> list[IPv4Address]:
    out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, check=True)
    return [
        IPv4Address(info["local"])
        for link in json.loads(out.stdout)
        for info in link.get("addr_info", [])
        if info.get("family") == "inet"
    ]


_LISTENER = """
import socket, sys
s = socket.create_server(("0.0.0.0", 9000))
s.settimeout(8)
print("listening", flush=True)
try:
    conn, peer = s.accept()
    print(peer[0], flush=True)
except socket.timeout:
    print("none", flush=True)
"""


@needs_netns
@pytest.mark.parametrize("nat", [True, False])
def test_outbound_through_the_host_is_masqueraded_when_nat_is_on(host: Host, nat: bool) -> None:
    net = host.network(nat=nat)
    att = net.attach("m1", "orga")
    # "Outside": a namespace of the test's own behind a veth pair, with no route back to the
    # machines' subnet; the internet is never touched.
    link = free_subnet(30, host.taken)
    here, there = list(link.hosts())
    outside, veth = f"{host.prefix}o", f"{host.prefix}o0"
    run = lambda *a: subprocess.run(list(a), check=True, capture_output=True)  # noqa: E731
    host.cleanups.append(lambda: subprocess.run(["ip", "netns", "del", outside]))
    host.cleanups.append(lambda: subprocess.run(["ip", "link", "del", veth], capture_output=True))
    run("ip", "netns", "add", outside)
    run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", outside)
    run("ip", "addr", "add", f"{here}/30", "dev", veth)
    run("ip", "link", "set", veth, "up")
    run("ip", "-n", outside, "addr", "add", f"{there}/30", "dev", "eth0")
    run("ip", "-n", outside, "link", "set", "eth0", "up")
    listener = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{outside}", sys.executable, "-c", _LISTENER],
        stdout=subprocess.PIPE,
        text=True,
    )
    host.cleanups.append(listener.kill)
    assert listener.stdout is not None
    assert listener.stdout.readline().strip() == "listening"
    result = _connect_from(att, there, 9000)
    if nat:
        assert result == "ok"
        assert ipaddress.ip_address(listener.stdout.readline().strip()) == here
    else:
        assert result == "timeout"  # the SYN left with the machine's address: no way back
    listener.kill()
    listener.wait()
