//! Which node a new session goes to.
//!
//! The node table is an immutable snapshot swapped atomically; sessions read it
//! without locks. Selection is a pure function of a snapshot (see `select`);
//! probing lives apart from it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;

use crate::config::{NodeConfig, RoutingConfig};

/// A node's identity: `host:port`, also its metric label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Arc<str>);

impl NodeId {
    pub fn new(host: &str, port: u16) -> Self {
        let id = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        NodeId(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One node as sessions see it.
#[derive(Debug)]
pub struct Node {
    pub config: NodeConfig,
    /// Sessions currently relayed to this node.
    active: AtomicUsize,
}

impl Node {
    pub fn id(&self) -> &NodeId {
        &self.config.id
    }

    pub fn active_sessions(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// Counts a session against its node for as long as it lives.
#[derive(Debug)]
pub struct SessionGuard {
    node: Arc<Node>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.node.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The node table and the selection over it.
#[derive(Debug)]
pub struct Router {
    nodes: ArcSwap<Vec<Arc<Node>>>,
    routing: RoutingConfig,
}

impl Router {
    pub fn new(nodes: &[NodeConfig], routing: &RoutingConfig) -> Self {
        Self {
            nodes: ArcSwap::from_pointee(
                nodes
                    .iter()
                    .map(|config| {
                        Arc::new(Node {
                            config: config.clone(),
                            active: AtomicUsize::new(0),
                        })
                    })
                    .collect(),
            ),
            routing: routing.clone(),
        }
    }

    /// Nodes to try for a new session, best first.
    pub fn candidates(&self) -> Vec<Arc<Node>> {
        self.nodes.load().iter().cloned().collect()
    }

    /// Marks a session as running on `node` until the guard drops.
    pub fn session_started(&self, node: &Arc<Node>) -> SessionGuard {
        node.active.fetch_add(1, Ordering::Relaxed);
        SessionGuard {
            node: Arc::clone(node),
        }
    }

    pub fn preferred_region(&self) -> Option<&str> {
        self.routing.region.as_deref()
    }
}
