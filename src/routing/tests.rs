//! Router: first round, failover order, load spreading.

use super::*;
use std::time::Duration;

fn router(regions: &[&str], region: Option<&str>) -> Router {
    let nodes: Vec<NodeConfig> = regions
        .iter()
        .enumerate()
        .map(|(i, r)| NodeConfig {
            id: NodeId::new("localhost", 5000 + i as u16),
            host: "localhost".into(),
            port: 5000 + i as u16,
            region: (*r).into(),
            addr: None,
        })
        .collect();
    let health = HealthConfig {
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        unhealthy_after: 2,
        healthy_after: 1,
        http_port: None,
    };
    Router::new(
        &nodes,
        &RoutingConfig {
            region: region.map(Into::into),
        },
        &health,
    )
}

fn probe_ok(ms: u64) -> Observation {
    Observation::ProbeOk {
        rtt: Duration::from_millis(ms),
        cert_expiry: None,
    }
}

fn ports(nodes: &[Arc<Node>]) -> Vec<u16> {
    nodes.iter().map(|n| n.config.port).collect()
}

#[tokio::test]
async fn first_round_completes_when_every_node_has_a_result() {
    let r = router(&["a", "b"], None);
    let nodes = r.nodes();
    assert!(!r.first_round_is_done());
    assert!(!r.any_up());
    r.observe(nodes[0].id(), &probe_ok(5));
    assert!(!r.first_round_is_done());
    assert!(r.any_up());
    r.observe(
        nodes[1].id(),
        &Observation::Failed {
            reason: "refused".into(),
        },
    );
    tokio::time::timeout(Duration::from_secs(1), r.first_round_done())
        .await
        .expect("first round is done");
}

#[test]
fn routes_to_the_nearest_region_and_fails_over_past_down_nodes() {
    let r = router(&["far", "near", "mid"], None);
    assert_eq!(
        ports(&r.candidates()),
        [5000, 5001, 5002],
        "config order before probes"
    );
    let nodes = r.nodes();
    for (node, ms) in nodes.iter().zip([60, 2, 20]) {
        r.observe(node.id(), &probe_ok(ms));
    }
    assert_eq!(r.nearest_region().as_deref(), Some("near"));
    assert_eq!(ports(&r.candidates()), [5001, 5002, 5000]);
    for _ in 0..2 {
        r.dial_failed(&nodes[1], "refused");
    }
    assert_eq!(r.nearest_region().as_deref(), Some("mid"));
    assert_eq!(ports(&r.candidates()), [5002, 5000, 5001], "down node last");
}

#[test]
fn spreads_sessions_over_a_region_by_load() {
    let r = router(&["a", "a", "b"], Some("a"));
    let mut guards = Vec::new();
    for _ in 0..20 {
        let best = r.candidates().remove(0);
        guards.push(r.session_started(&best));
    }
    let nodes = r.nodes();
    assert_eq!(nodes[0].active_sessions(), 10);
    assert_eq!(nodes[1].active_sessions(), 10);
    assert_eq!(nodes[2].active_sessions(), 0);
    drop(guards);
    assert_eq!(nodes[0].active_sessions(), 0);
    let dial = r.dial_started(&nodes[1]);
    assert_eq!(
        r.candidates()[0].config.port,
        5000,
        "dials in flight count as load"
    );
    drop(dial);
}
