//! Helpers shared by the operations tests (metrics, reload, drain, limits,
//! logging): loopback client addresses, a config as text, `select 1`, and
//! stopping a node off the runtime.

use super::*;

pub const LOOPBACK_1: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
pub const LOOPBACK_2: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Config text: one listener on 127.0.0.1:0 allowing `allow`, `nodes`, and `extra` TOML.
pub fn config_text(pki: &Pki, nodes: Vec<NodeEntry>, allow: &[&str], extra: &str) -> String {
    let mut config = GateConfig::new(pki.ca_file(), nodes);
    config.allow = allow.iter().map(|a| (*a).to_owned()).collect();
    config.extra = extra.to_owned();
    config.to_toml()
}

/// Runs `select 1` and says whether it worked.
pub async fn select_one(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    let row = tokio::time::timeout(Duration::from_secs(20), client.query_one("select 1", &[]))
        .await
        .expect("query answers within 20s")?;
    assert_eq!(row.get::<_, i32>(0), 1);
    Ok(())
}

pub async fn stop_node(node: PgNode) {
    tokio::task::spawn_blocking(move || drop(node))
        .await
        .expect("stopping a node does not panic");
}
