//! The client address allowlist: a pure decision over CIDR ranges, made before
//! a single byte is read from the client.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// CIDR ranges a listener admits clients from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist {
    nets: Vec<IpNet>,
}

impl Allowlist {
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self {
            nets: nets.into_iter().map(|n| n.trunc()).collect(),
        }
    }

    /// The default: `127.0.0.0/8` and `::1/128`.
    pub fn loopback() -> Self {
        Self::new(vec![
            IpNet::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8).expect("valid prefix"),
            IpNet::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 128).expect("valid prefix"),
        ])
    }

    /// Whether `addr` is inside one of the ranges. An IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`, as seen on a dual-stack socket) is judged as the IPv4
    /// address it carries.
    pub fn permits(&self, addr: IpAddr) -> bool {
        let addr = normalise(addr);
        self.nets.iter().any(|net| net.contains(&addr))
    }

    /// Whether a range covers a whole address family (`0.0.0.0/0` or `::/0`).
    pub fn admits_everyone(&self) -> bool {
        self.nets.iter().any(|n| n.prefix_len() == 0)
    }

    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }
}

/// Maps `::ffff:a.b.c.d` to `a.b.c.d`; other addresses are unchanged.
pub fn normalise(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(nets: &[&str]) -> Allowlist {
        Allowlist::new(nets.iter().map(|n| n.parse().expect("cidr")).collect())
    }

    #[test]
    fn permits_only_addresses_inside_the_ranges() {
        let cases = [
            (list(&["127.0.0.1/32"]), "127.0.0.1", true),
            (list(&["127.0.0.1/32"]), "127.0.0.2", false),
            (list(&["127.0.0.1/32"]), "::ffff:127.0.0.1", true),
            (list(&["127.0.0.1/32"]), "::ffff:127.0.0.2", false),
            (list(&["10.1.2.3/8"]), "10.200.0.1", true),
            (list(&["::1/128"]), "::1", true),
            (list(&["::1/128"]), "127.0.0.1", false),
            (list(&["fd00::/8"]), "fd12::1", true),
            (list(&[]), "127.0.0.1", false),
            (Allowlist::loopback(), "127.0.0.53", true),
            (Allowlist::loopback(), "::1", true),
            (Allowlist::loopback(), "192.168.1.1", false),
            (list(&["0.0.0.0/0"]), "8.8.8.8", true),
            (list(&["0.0.0.0/0"]), "::ffff:8.8.8.8", true),
        ];
        assert!(!cases.is_empty());
        for (allow, addr, want) in cases {
            let ip: IpAddr = addr.parse().expect("ip");
            assert_eq!(allow.permits(ip), want, "{addr} in {:?}", allow.nets());
        }
    }

    #[test]
    fn knows_when_it_admits_everyone() {
        assert!(list(&["::/0"]).admits_everyone());
        assert!(!Allowlist::loopback().admits_everyone());
    }
}
