//! Network-namespace fixtures: a "lab" of isolated networks joined by one
//! backbone, each created with a unique name and deleted on drop (also when
//! the test panics).
//!
//! Layout: a backbone namespace holds a bridge; the root namespace and every
//! site namespace get one veth into that bridge with an address in one random
//! `/24` of 100.64.0.0/10 (the backbone). Nothing else connects the sites: a
//! site's own addresses (its "VPC", e.g. 10.0.0.0/24 on `lo`) are invisible to
//! the others, so two sites may use the same CIDR, as real VPCs do.
//!
//! A NAT site ([`Lab::add_nat_site`]) is a site behind a router namespace, as
//! most customer networks are: the router has the backbone address, the site
//! only a LAN address behind it; the router masquerades what the site sends
//! and lets nothing new in (nftables), so the site can open connections out
//! but nobody can open one to it.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::net::{random_byte, unique_suffix};

/// Runs `ip <args>` and panics with its stderr if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run `ip {}`: {e} (is iproute2 installed?)", args.join(" ")));
    assert!(out.status.success(), "`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
}

/// A network namespace deleted on drop, with its `/etc/netns/<name>/`
/// files (if any were written) removed too.
pub struct Netns {
    name: String,
    etc_dir: Option<PathBuf>,
}

impl Netns {
    /// Creates `<prefix>-<random>` with its loopback up.
    pub fn new(prefix: &str) -> Netns {
        let name = format!("{prefix}-{}", unique_suffix(8));
        ip(&["netns", "add", &name]);
        let ns = Netns { name, etc_dir: None };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// `ip netns exec <ns> <program>`, to add arguments to and run.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Writes `/etc/netns/<name>/hosts`, which `ip netns exec` bind-mounts
    /// over `/etc/hosts` for every program it starts in this namespace, so
    /// names listed there resolve only inside this network. Must be called
    /// before those programs start; the file is removed when `self` drops.
    pub fn set_hosts(&mut self, hosts: &str) {
        self.write_etc_file("hosts", hosts);
    }

    /// Writes `/etc/netns/<name>/resolv.conf`, which `ip netns exec` mounts
    /// over `/etc/resolv.conf`: the namespace's own resolver configuration.
    /// Same rules as [`Netns::set_hosts`].
    pub fn set_resolv_conf(&mut self, resolv_conf: &str) {
        self.write_etc_file("resolv.conf", resolv_conf);
    }

    fn write_etc_file(&mut self, file: &str, content: &str) {
        let dir = Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        self.etc_dir = Some(dir.clone());
        let path = dir.join(file);
        std::fs::write(&path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Loads nftables `rules` (the text of an `nft -f` file) inside the namespace.
    pub fn nft(&self, rules: &str) {
        use std::io::Write;
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run nft in {}: {e} (is Debian's nftables installed?)", self.name));
        child.stdin.take().expect("piped stdin").write_all(rules.as_bytes()).expect("write the nft rules");
        let out = child.wait_with_output().expect("wait for nft");
        assert!(out.status.success(), "nft in {}: {}\n{rules}", self.name, String::from_utf8_lossy(&out.stderr));
    }

    /// Runs `sysctl -w key=value` inside the namespace.
    pub fn sysctl(&self, key_value: &str) {
        let out = self.command("sysctl").args(["-q", "-w", key_value]).output().expect("run sysctl");
        assert!(out.status.success(), "sysctl {key_value} in {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(dir) = self.etc_dir.take()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            eprintln!("warning: could not remove {}: {e}", dir.display());
        }
        let out = Command::new("ip").args(["netns", "del", &self.name]).stdin(Stdio::null()).output();
        if let Ok(out) = out
            && !out.status.success()
        {
            eprintln!("warning: could not delete netns {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// The backbone: a bridge in its own namespace, and the root namespace's
/// address on it (where a control plane in the root namespace listens).
pub struct Lab {
    backbone: Netns,
    net: [u8; 3],
    root_if: String,
    next_host: u8,
}

/// One isolated network (a "VPC"), attached to the backbone with one address.
pub struct Site {
    pub ns: Netns,
    /// This site's address on the backbone (where its agent listens and dials from).
    pub backbone_addr: Ipv4Addr,
}

impl Lab {
    /// Creates the backbone namespace and bridge and attaches the root namespace.
    pub fn new() -> Lab {
        let backbone = Netns::new("trbb");
        backbone.ip(&["link", "add", "br0", "type", "bridge"]);
        backbone.ip(&["link", "set", "br0", "up"]);
        let net = [100, 64 + random_byte() % 64, random_byte()];
        let root_if = format!("trr{}", unique_suffix(8));
        let lab = Lab { backbone, net, root_if, next_host: 2 };
        ip(&["link", "add", &lab.root_if, "type", "veth", "peer", "name", "root0", "netns", lab.backbone.name()]);
        lab.backbone.ip(&["link", "set", "root0", "master", "br0", "up"]);
        ip(&["addr", "add", &format!("{}/24", lab.root_addr()), "dev", &lab.root_if]);
        ip(&["link", "set", &lab.root_if, "up"]);
        lab
    }

    /// The root namespace's address on the backbone.
    pub fn root_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], 1)
    }

    /// The backbone's CIDR.
    pub fn backbone_cidr(&self) -> String {
        format!("{}.{}.{}.0/24", self.net[0], self.net[1], self.net[2])
    }

    /// Creates a site namespace `<prefix>-<random>` attached to the backbone.
    pub fn add_site(&mut self, prefix: &str) -> Site {
        let host = self.next_host;
        self.next_host += 1;
        let ns = Netns::new(prefix);
        let port = format!("s{host}");
        self.backbone.ip(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns.name()]);
        self.backbone.ip(&["link", "set", &port, "master", "br0", "up"]);
        let addr = Ipv4Addr::new(self.net[0], self.net[1], self.net[2], host);
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        Site { ns, backbone_addr: addr }
    }
}

/// A site behind a NAT router: the site namespace has only a LAN address
/// and a default route to the router; the router namespace holds the
/// site's one backbone address.
pub struct NatSite {
    /// The site's own network (where its agent runs).
    pub ns: Netns,
    /// The NAT router between the site's LAN and the backbone.
    pub router: Netns,
    /// The site's address on its LAN (unreachable from outside).
    pub lan_addr: Ipv4Addr,
    /// The router's LAN address (the site's default gateway).
    pub gateway_addr: Ipv4Addr,
    /// The router's address on the backbone: what others see the site's connections come from.
    pub public_addr: Ipv4Addr,
}

/// The router's rules: masquerade what leaves through the backbone; forward
/// what the LAN opens and the answers to it, nothing else.
const NAT_RULES: &str = "\
table ip nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname \"wan\" masquerade
    }
}
table inet filter {
    chain forward_lan {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname \"lan\" accept
    }
}
";

impl Lab {
    /// Creates a site `<prefix>-<random>` behind a NAT router namespace
    /// (`<prefix>r-<random>`) attached to the backbone. The LAN is
    /// `192.168.H.0/24` (H: the router's host number on the backbone), the
    /// router `.1`, the site `.2`.
    pub fn add_nat_site(&mut self, prefix: &str) -> NatSite {
        let host = self.next_host;
        self.next_host += 1;
        let router = Netns::new(&format!("{prefix}r"));
        let port = format!("s{host}");
        self.backbone.ip(&["link", "add", &port, "type", "veth", "peer", "name", "wan", "netns", router.name()]);
        self.backbone.ip(&["link", "set", &port, "master", "br0", "up"]);
        let public_addr = Ipv4Addr::new(self.net[0], self.net[1], self.net[2], host);
        router.ip(&["addr", "add", &format!("{public_addr}/24"), "dev", "wan"]);
        router.ip(&["link", "set", "wan", "up"]);

        let ns = Netns::new(prefix);
        let gateway_addr = Ipv4Addr::new(192, 168, host, 1);
        let lan_addr = Ipv4Addr::new(192, 168, host, 2);
        router.ip(&["link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", ns.name()]);
        router.ip(&["addr", "add", &format!("{gateway_addr}/24"), "dev", "lan"]);
        router.ip(&["link", "set", "lan", "up"]);
        ns.ip(&["addr", "add", &format!("{lan_addr}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["route", "add", "default", "via", &gateway_addr.to_string()]);
        router.sysctl("net.ipv4.ip_forward=1");
        router.nft(NAT_RULES);
        NatSite { ns, router, lan_addr, gateway_addr, public_addr }
    }
}

impl NatSite {
    /// `ip netns exec <site> <program>`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.ns.command(program)
    }

    /// Gives the site a "LAN" address on its loopback (`ip addr add A/32 dev lo`).
    pub fn add_local_address(&self, addr: IpAddr) {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        self.ns.ip(&["addr", "add", &format!("{addr}/{prefix}"), "dev", "lo"]);
    }

    /// The site's LAN, `192.168.H.0/24`.
    pub fn lan_cidr(&self) -> String {
        let [a, b, c, _] = self.lan_addr.octets();
        format!("{a}.{b}.{c}.0/24")
    }
}

impl Default for Lab {
    fn default() -> Self {
        Lab::new()
    }
}

impl Site {
    /// Gives the site a "LAN" address on its loopback (`ip addr add A/32 dev lo`).
    pub fn add_local_address(&self, addr: IpAddr) {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        self.ns.ip(&["addr", "add", &format!("{addr}/{prefix}"), "dev", "lo"]);
    }

    /// Makes a whole CIDR local (`ip route add local CIDR dev lo`), as an
    /// operator does for an endpoint address pool.
    pub fn add_local_route(&self, cidr: &str) {
        self.ns.ip(&["route", "add", "local", cidr, "dev", "lo"]);
    }

    /// `ip netns exec <site> <program>`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.ns.command(program)
    }
}
