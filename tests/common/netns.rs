//! Other hosts for tests: a network namespace joined to this one by a veth
//! pair, with addresses in 10.77.0.0/16 that exist only inside the pairs the
//! tests make. Removed on drop (the namespace and both veth ends), even when
//! the test fails.

use super::*;

/// One namespace: `ns_ip` inside, `host_ip` on this side of the veth pair.
pub struct NetNs {
    pub name: String,
    host_if: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e} (iproute2 is required)"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    /// A namespace on subnet `10.77.<subnet>.0/24`: this side `.1`, the
    /// namespace `.2`, its default route via `.1`. `subnet` must be unique
    /// among the namespaces alive at once; the process id keeps names apart.
    pub fn create(subnet: u8) -> NetNs {
        let tag = format!("{}{subnet}", std::process::id() % 100_000);
        let name = format!("sgns{tag}");
        let (host_if, ns_if) = (format!("sgh{tag}"), format!("sgn{tag}"));
        let host_ip = Ipv4Addr::new(10, 77, subnet, 1);
        let ns_ip = Ipv4Addr::new(10, 77, subnet, 2);
        // Leftovers of a killed earlier run with the same pid and subnet.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        let ns = NetNs {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ip,
            ns_ip,
        };
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        in_ns(&["addr", "add", &format!("{ns_ip}/24"), "dev", &ns_if]);
        in_ns(&["link", "set", &ns_if, "up"]);
        in_ns(&["link", "set", "lo", "up"]);
        in_ns(&["route", "add", "default", "via", &host_ip.to_string()]);
        ns
    }

    /// `program args…` run inside the namespace.
    pub fn command(&self, program: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `program args` inside the namespace, bounded by `timeout`.
    pub async fn run(&self, program: &str, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = self.command(program);
        cmd.args(args);
        clients::clear_libpq_env(&mut cmd);
        clients::output_within(&mut cmd, timeout).await
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}
