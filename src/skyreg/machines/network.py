"""A network namespace per machine: loopback, a private address, a route out through the host.

Used by `skyreg agent --network`. `HostNetwork` owns everything it makes on the host, all of it
named from one short `prefix`:

* a Linux bridge per org, `<prefix>b<hash(org)>`, holding the org's gateway address (the
  first address of a block of the host's `subnet`, `/block_prefix` each); its alias is the
  org id, so an agent restart can read it back;
* per machine, a named network namespace `/run/netns/<prefix>-<machine id>` (made by
  `ip netns add`: a tmpfs, so a reboot forgets it along with the machines) holding `lo` and
  `eth0`, one end of a veth pair whose host end `<prefix>v<hash(machine id)>` is a port of the
  org's bridge;
* iptables chains in the filter table: `SKYREG-<PREFIX>`, jumped to first from FORWARD, and
  `SKYREG-<PREFIX>-IN`, jumped to first from INPUT; and (with `nat`) one in the nat table,
  jumped to from POSTROUTING, for MASQUERADE.

Why a bridge per org rather than one bridge with filtering rules. Frames between ports of
one bridge never reach iptables unless `br_netfilter` is loaded (and then only IP, not ARP):
isolating orgs on a shared bridge would depend on a kernel module and on ebtables. With a
bridge per org, machines of one org talk at layer 2 and anything between orgs has to be
routed by the host, where the FORWARD chain sees it: `-i <prefix>b+ -o <prefix>b+` is
rejected (icmp admin-prohibited: a connect fails at once with EHOSTUNREACH), and so is
anything towards 169.254.0.0/16 (a cloud's metadata service would answer with the host's
credentials), after a per-org
accept of `-i BR -o BR` for hosts that do load br_netfilter with a DROP policy. Each bridge
drops packets whose source is not in its block (a machine has no CAP_NET_ADMIN to change its
address, and this holds if it ever gets one). Machines reach the rest through the host
(masqueraded when `nat`), but no service of the host itself: INPUT from `<prefix>b+` is
rejected but for replies (ESTABLISHED, RELATED), so a machine cannot reach the agent, the
server or anything listening on the host, at the gateway or any other of its addresses. New
connections from elsewhere towards the machines are dropped. The host reaches every machine
directly (OUTPUT, not FORWARD; the replies come back as ESTABLISHED): the agent's health
checks and the proxy. Rules are written with `iptables-restore --noflush`, one atomic swap
per table, so isolation never lapses.

State lives in the kernel, not in a file: `ensure()` reads the bridges (block, alias) and the
namespaces (eth0's address) back, so after an agent restart the allocator knows every address
in use. Addresses are unique on the host because org blocks are disjoint. A machine's
namespace must be detached after the machine stopped (`ip link del` of its veth, then the
namespace): a process still inside would keep the namespace alive.

No shell anywhere: every command is an argv list, and ids that reach a name are checked
against a strict pattern first. All methods block (they run `ip` and `iptables`); an asyncio
caller runs them in an executor. One `HostNetwork` per prefix per host; its methods are
serialised by a lock.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import subprocess
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

IP = "ip"
IPTABLES = "iptables"
IPTABLES_RESTORE = "iptables-restore"
NSENTER = "nsenter"
SETPRIV = "setpriv"
NETNS_DIR = Path("/run/netns")
GUEST_IF = "eth0"
LINK_LOCAL = IPv4Network("169.254.0.0/16")
_IFNAMSIZ = 15
_HASH_CHARS = 9
_PREFIX = re.compile(r"[a-z][a-z0-9]{0,4}")  # + "b"/"v" + 9 hex chars = 15 at most
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LOCK_WAIT = "5"  # seconds iptables waits for the xtables lock


class NetworkError(Exception):
    """The host network cannot be set up, or a machine cannot be attached to it."""


@dataclass(frozen=True, slots=True)
class Attachment:
    """A machine's place on the network."""

    machine_id: str
    org: str
    netns_path: Path
    """The named namespace (`/run/netns/...`): hand it to `enter_command`."""
    address: IPv4Address
    network: IPv4Network
    """The org's block; `address` is in it (as eth0's address with this prefix length)."""
    gateway: IPv4Address
    """The host's address on the org's bridge; the machine's default route."""


def check_id(value: str, what: str) -> str:
    """`value` if it is a safe machine or org id (letters, digits, `_.-`, 1-64, no leading
    punctuation), else `NetworkError`: an id never becomes an option or a path of its own."""
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        raise NetworkError(f"invalid {what} id: {repr(value)[:80]}")
    return value


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:_HASH_CHARS]


def enter_command(
    attachment: Attachment, *, user: tuple[int, int, list[int]] | None = None
) -> list[str]:
    """The argv prefix that runs a command (bwrap) inside the machine's namespace.

    bwrap cannot join a namespace itself: `nsenter --net=PATH` does (it needs root), then execs
    the rest. For a machine that runs bwrap as another user (`user` = uid, gid, supplementary
    gids), `setpriv` drops to it after nsenter, in place of Popen's `user=`/`group=`, which
    would apply before nsenter and leave it without the right to join.
    """
    argv = [NSENTER, f"--net={attachment.netns_path}", "--"]
    if user is not None:
        uid, gid, groups = user
        argv += [SETPRIV, f"--reuid={uid}", f"--regid={gid}"]
        argv += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
        argv.append("--")
    return argv


def _no_ipv6(ifname: str) -> None:
    """Turn IPv6 off on a host end (bridge or veth), before it is up: the iptables rules are
    IPv4's, and with IPv6 on, a machine would reach every service of the host listening on `::`
    at the bridge's link-local address. Nothing to do on a host without IPv6."""
    knob = Path("/proc/sys/net/ipv6/conf") / ifname / "disable_ipv6"
    if knob.parent.parent.is_dir():
        try:
            knob.write_text("1\n")
        except OSError as e:
            raise NetworkError(f"cannot turn IPv6 off on {ifname}: {e}") from None


def _run(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=30
    )
    if check and proc.returncode != 0:
        raise NetworkError(f"{' '.join(argv[:4])}...: {proc.stderr.strip()[:300]}")
    return proc.stdout


def _json(*argv: str) -> list[dict[str, object]]:
    out = _run(*argv).strip()
    doc = json.loads(out) if out else []
    return [d for d in doc if isinstance(d, dict)] if isinstance(doc, list) else []


def _ipv4_addrs(entry: dict[str, object]) -> list[tuple[IPv4Address, int]]:
    infos = entry.get("addr_info")
    found = []
    for info in infos if isinstance(infos, list) else []:
        if isinstance(info, dict) and info.get("family") == "inet":
            found.append((IPv4Address(info["local"]), int(info["prefixlen"])))
    return found


class HostNetwork:
    """The machines' networks on this host: see the module docstring."""

    def __init__(
        self,
        prefix: str,
        subnet: IPv4Network,
        *,
        nat: bool = True,
        block_prefix: int = 24,
        max_machines: int | None = None,
    ) -> None:
        if _PREFIX.fullmatch(prefix) is None:
            raise NetworkError(f"invalid prefix {prefix!r}: 1-5 of [a-z0-9], a letter first")
        if not subnet.is_private or not subnet.prefixlen <= block_prefix <= 29:
            raise NetworkError(f"{subnet} must be private and hold /{block_prefix} blocks (≤ /29)")
        self.prefix = prefix
        self.subnet = subnet
        self.nat = nat
        self.block_prefix = block_prefix
        blocks = 1 << (block_prefix - subnet.prefixlen)
        hosts = blocks * ((1 << (32 - block_prefix)) - 3)  # no network, gateway, broadcast
        self.max_machines = hosts if max_machines is None else min(max_machines, hosts)
        self.chain = f"SKYREG-{prefix.upper()}"
        self.input_chain = f"{self.chain}-IN"
        self._lock = threading.Lock()
        self._orgs: dict[str, IPv4Network] = {}  # org id -> its block
        self._machines: dict[str, Attachment] = {}

    # ----------------------------------------------------------------------- names

    def bridge_name(self, org: str) -> str:
        """The org's bridge: ≤ 15 characters, derived from a hash of the id."""
        return f"{self.prefix}b{_hash(check_id(org, 'org'))}"

    def veth_name(self, machine_id: str) -> str:
        """The host end of the machine's veth pair."""
        return f"{self.prefix}v{_hash(check_id(machine_id, 'machine'))}"

    def netns_path(self, machine_id: str) -> Path:
        """Where the machine's named namespace lives."""
        return NETNS_DIR / self._netns_name(machine_id)

    def _netns_name(self, machine_id: str) -> str:
        return f"{self.prefix}-{check_id(machine_id, 'machine')}"

    # ----------------------------------------------------------------------- host setup

    def ensure(self) -> None:
        """Set up (or re-adopt after a restart) the chains and the state of what exists.

        Idempotent. Raises `NetworkError` when the subnet overlaps a route that is not ours
        or the host does not forward IPv4.
        """
        with self._lock:
            if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != "1":
                raise NetworkError("net.ipv4.ip_forward is off: machines could not reach out")
            self._check_routes()
            self._readopt()
            self._sync_rules()

    def _check_routes(self) -> None:
        for route in _json(IP, "-j", "-4", "route", "show"):
            dst, dev = str(route.get("dst", "")), str(route.get("dev", ""))
            if dst == "default" or dev.startswith(f"{self.prefix}b"):
                continue
            try:
                net = ipaddress.ip_network(dst, strict=False)
            except ValueError:
                continue
            if net.overlaps(self.subnet):
                raise NetworkError(f"{self.subnet} overlaps the host's route to {dst} ({dev})")

    def _readopt(self) -> None:
        self._orgs.clear()
        self._machines.clear()
        by_block: dict[IPv4Network, str] = {}
        for link in _json(IP, "-j", "-d", "addr", "show", "type", "bridge"):
            name, org = str(link.get("ifname", "")), str(link.get("ifalias", ""))
            if not name.startswith(f"{self.prefix}b"):
                continue
            addrs = [a for a, p in _ipv4_addrs(link) if p == self.block_prefix]
            if _ID.fullmatch(org) is None or name != self.bridge_name(org) or not addrs:
                _run(IP, "link", "del", name, check=False)  # half made: start again
                continue
            block = IPv4Network((addrs[0], self.block_prefix), strict=False)
            self._orgs[org] = block
            by_block[block] = org
        stale = []
        for path in NETNS_DIR.glob(f"{self.prefix}-*") if NETNS_DIR.is_dir() else []:
            machine_id = path.name[len(self.prefix) + 1 :]
            if _ID.fullmatch(machine_id) is None:
                continue
            addr = self._guest_address(path.name)
            net = IPv4Network((addr, self.block_prefix), strict=False) if addr else None
            owner = by_block.get(net) if net else None
            if addr is None or net is None or owner is None:
                stale.append(machine_id)  # half made, or its org's bridge is gone
                continue
            gateway = net.network_address + 1
            self._machines[machine_id] = Attachment(machine_id, owner, path, addr, net, gateway)
        for machine_id in stale:
            self._remove_machine(machine_id)

    def _guest_address(self, netns: str) -> IPv4Address | None:
        try:
            links = _json(IP, "-n", netns, "-j", "-4", "addr", "show", "dev", GUEST_IF)
        except NetworkError:
            return None
        addrs = [a for link in links for a, p in _ipv4_addrs(link) if p == self.block_prefix]
        return addrs[0] if addrs else None

    def _sync_rules(self) -> None:
        """Write our chains whole, atomically, and hook them in once."""
        ours = f"{self.prefix}b+"
        reject = "REJECT --reject-with icmp-admin-prohibited"
        lines = ["*filter", f":{self.chain} - [0:0]", f":{self.input_chain} - [0:0]"]
        for org, block in sorted(self._orgs.items()):
            br = self.bridge_name(org)
            lines.append(f"-A {self.chain} -i {br} ! -s {block} -j DROP")
            lines.append(f"-A {self.chain} -i {br} -o {br} -j ACCEPT")
        lines += [
            f"-A {self.chain} -i {ours} -o {ours} -j REJECT --reject-with icmp-admin-prohibited",
            # Link-local: a cloud's metadata service (169.254.169.254) answers whoever asks
            # from the host with the host's credentials.
            f"-A {self.chain} -i {ours} -d {LINK_LOCAL} -j {reject}",
            f"-A {self.chain} -o {ours} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            f"-A {self.chain} -o {ours} -j DROP",
            f"-A {self.chain} -i {ours} -j ACCEPT",
            # To the host itself: replies to its own connections (health checks, the proxy).
            f"-A {self.input_chain} -i {ours} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            f"-A {self.input_chain} -i {ours} -j REJECT --reject-with icmp-admin-prohibited",
            "COMMIT",
        ]
        texts = ["\n".join(lines) + "\n"]
        nat = ["*nat", f":{self.chain} - [0:0]"]
        if self.nat:
            nat.append(f"-A {self.chain} -s {self.subnet} ! -d {self.subnet} -j MASQUERADE")
        texts.append("\n".join([*nat, "COMMIT"]) + "\n")
        for text in texts:
            _run(IPTABLES_RESTORE, "-w", _LOCK_WAIT, "--noflush", stdin=text)
        for table, hook, chain in self._hooks():
            if not self._hooked(table, hook, chain):
                _run(IPTABLES, "-w", _LOCK_WAIT, "-t", table, "-I", hook, "1", "-j", chain)

    def _hooks(self) -> list[tuple[str, str, str]]:
        """(table, built-in chain, our chain) of every jump we add."""
        return [
            ("filter", "FORWARD", self.chain),
            ("filter", "INPUT", self.input_chain),
            ("nat", "POSTROUTING", self.chain),
        ]

    def _hooked(self, table: str, hook: str, chain: str) -> bool:
        rules = _run(IPTABLES, "-w", _LOCK_WAIT, "-t", table, "-S", hook)
        return f"-A {hook} -j {chain}" in rules.splitlines()

    def teardown(self) -> None:
        """Remove every namespace, link, chain and rule this prefix made. Safe to repeat."""
        with self._lock:
            for path in NETNS_DIR.glob(f"{self.prefix}-*") if NETNS_DIR.is_dir() else []:
                machine_id = path.name[len(self.prefix) + 1 :]
                if _ID.fullmatch(machine_id) is not None:
                    self._remove_machine(machine_id)
            for link in _json(IP, "-j", "link", "show"):
                name = str(link.get("ifname", ""))
                if (
                    name.startswith((f"{self.prefix}b", f"{self.prefix}v"))
                    and len(name) == len(self.prefix) + 1 + _HASH_CHARS
                ):
                    _run(IP, "link", "del", name, check=False)
            for table, hook, chain in self._hooks():
                while self._hooked(table, hook, chain):
                    _run(IPTABLES, "-w", _LOCK_WAIT, "-t", table, "-D", hook, "-j", chain)
                _run(IPTABLES, "-w", _LOCK_WAIT, "-t", table, "-F", chain, check=False)
                _run(IPTABLES, "-w", _LOCK_WAIT, "-t", table, "-X", chain, check=False)
            self._orgs.clear()
            self._machines.clear()

    # ----------------------------------------------------------------------- machines

    def attachment(self, machine_id: str) -> Attachment | None:
        """The machine's attachment, if it is attached."""
        return self._machines.get(check_id(machine_id, "machine"))

    def attach(self, machine_id: str, org: str) -> Attachment:
        """Give the machine its namespace, veth, address and default route (idempotent)."""
        check_id(machine_id, "machine")
        check_id(org, "org")
        with self._lock:
            known = self._machines.get(machine_id)
            if known is not None:
                if known.org != org:
                    raise NetworkError(f"machine {machine_id} is attached to another org")
                return known
            if len(self._machines) >= self.max_machines:
                raise NetworkError(f"this host holds at most {self.max_machines} machines")
            block = self._org_block(org)
            used = {a.address for a in self._machines.values()}
            gateway = block.network_address + 1
            free = (a for a in block.hosts() if a != gateway and a not in used)
            address = next(free, None)
            if address is None:
                raise NetworkError(f"org {org} has no free address on this host")
            att = Attachment(machine_id, org, self.netns_path(machine_id), address, block, gateway)
            try:
                self._plumb(att)
            except BaseException:
                self._remove_machine(machine_id)
                raise
            self._machines[machine_id] = att
            return att

    def _org_block(self, org: str) -> IPv4Network:
        block = self._orgs.get(org)
        if block is not None:
            return block
        taken = set(self._orgs.values())
        block = next(
            (b for b in self.subnet.subnets(new_prefix=self.block_prefix) if b not in taken), None
        )
        if block is None:
            raise NetworkError(f"no free /{self.block_prefix} block left in {self.subnet}")
        br = self.bridge_name(org)
        try:
            _run(IP, "link", "add", br, "type", "bridge")
            _no_ipv6(br)
            _run(IP, "link", "set", "dev", br, "alias", org)
            _run(IP, "addr", "add", f"{block.network_address + 1}/{self.block_prefix}", "dev", br)
            _run(IP, "link", "set", "dev", br, "up")
            self._orgs[org] = block
            self._sync_rules()
        except BaseException:
            self._orgs.pop(org, None)
            _run(IP, "link", "del", br, check=False)
            raise
        return block

    def _plumb(self, att: Attachment) -> None:
        ns, veth = self._netns_name(att.machine_id), self.veth_name(att.machine_id)
        _run(IP, "netns", "add", ns)
        _run(IP, "link", "add", veth, "type", "veth", "peer", "name", GUEST_IF, "netns", ns)
        _no_ipv6(veth)
        _run(IP, "link", "set", "dev", veth, "master", self.bridge_name(att.org))
        _run(IP, "link", "set", "dev", veth, "up")
        inside = [IP, "-n", ns]
        # No IPv6 address inside either: the rules above are IPv4's.
        _run(*inside, "link", "set", "dev", GUEST_IF, "addrgenmode", "none")
        _run(*inside, "link", "set", "dev", "lo", "up")
        _run(*inside, "addr", "add", f"{att.address}/{self.block_prefix}", "dev", GUEST_IF)
        _run(*inside, "link", "set", "dev", GUEST_IF, "up")
        _run(*inside, "route", "add", "default", "via", str(att.gateway))

    def detach(self, machine_id: str) -> None:
        """Remove the machine's veth pair and namespace (after it stopped). Safe to repeat.

        The org's bridge goes with its last machine, and its block is free again.
        """
        check_id(machine_id, "machine")
        with self._lock:
            att = self._machines.pop(machine_id, None)
            self._remove_machine(machine_id)
            if att is not None and not any(a.org == att.org for a in self._machines.values()):
                self._orgs.pop(att.org, None)
                self._sync_rules()
                _run(IP, "link", "del", self.bridge_name(att.org), check=False)

    def _remove_machine(self, machine_id: str) -> None:
        # The veth first: deleting the namespace alone leaves it (and the address) alive as
        # long as a process is still inside.
        _run(IP, "link", "del", self.veth_name(machine_id), check=False)
        _run(IP, "netns", "del", self._netns_name(machine_id), check=False)
