//! sqlgate's own drain, for an unpooled session: which sessions are *at
//! rest* (at a ReadyForQuery `I`, nothing asked and not answered, no COPY),
//! and how one is closed there.
//!
//! [`AtRest`] is the relay's observer: it scans only message headers (see
//! [`Boundaries`]) and forwards every byte, Terminate included. When the drain
//! begins, the relay stops at the first moment the session is at rest
//! ([`relay::relay_until_rest`]); [`close_at_rest`] then tells the client
//! FATAL 57P01, as PostgreSQL tells idle sessions at a fast shutdown, and
//! ends the server session with Terminate, so that the node logs a clean end.

use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::pgwire::boundary::Boundaries;
use crate::pgwire::boundary::ServerStream;
use crate::pgwire::error::{SqlState, fatal};
use crate::pgwire::startup::TransactionStatus;
use crate::relay::{self, Observer};

/// What an idle session at the drain is told, after the server's last
/// message: PostgreSQL's own words for a session ended by a shutdown, so that
/// drivers and pools that know 57P01 (HikariCP, pgx, libpq) treat it as a
/// connection to replace.
pub const DRAIN_MESSAGE: &str = "sqlgate: terminating connection due to administrator command (sqlgate is shutting down); reconnect";

/// The plain relay's boundary tracker: header scans only, no byte withheld.
#[derive(Debug, Clone)]
pub struct AtRest(Boundaries);

impl AtRest {
    /// A session right after a ReadyForQuery with `status` (the end of the
    /// startup relay).
    pub fn after_ready(status: TransactionStatus) -> Self {
        AtRest(Boundaries {
            server: ServerStream::after_ready(status),
            client: Default::default(),
        })
    }

    /// Scans server bytes sent to the client outside the relay (those that
    /// followed the startup's ReadyForQuery).
    pub fn server_sent(&mut self, data: &[u8]) {
        self.0.server.observe(data);
    }

    /// Scans client bytes sent to the server outside the relay.
    pub fn client_sent(&mut self, data: &[u8]) {
        self.0.client.observe(data);
    }
}

impl Observer for AtRest {
    fn client_bytes(&mut self, data: &[u8]) -> usize {
        // Scanned for boundaries only: a Terminate goes on to the server.
        self.0.client.observe(data);
        data.len()
    }
    fn upstream_bytes(&mut self, data: &[u8]) {
        self.0.server.observe(data);
    }
    fn at_rest(&self) -> bool {
        self.0.is_clean()
    }
}

/// Closes a session stopped at rest: FATAL 57P01 and a close to the client,
/// Terminate and a close to the server, all within [`relay::CLOSE_GRACE`].
/// Errors are ignored: the session is over either way.
pub async fn close_at_rest<C, U>(client: &mut C, upstream: &mut U)
where
    C: AsyncWrite + Unpin + ?Sized,
    U: AsyncWrite + Unpin + ?Sized,
{
    const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];
    let farewell = async {
        let to_client = async {
            let _ = client
                .write_all(&fatal(SqlState::ADMIN_SHUTDOWN, DRAIN_MESSAGE))
                .await;
            let _ = client.shutdown().await;
        };
        let to_upstream = async {
            let _ = upstream.write_all(&TERMINATE).await;
            let _ = upstream.shutdown().await;
        };
        tokio::join!(to_client, to_upstream);
    };
    let _ = tokio::time::timeout(relay::CLOSE_GRACE, farewell).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn at_rest_only_between_answered_queries_outside_a_transaction() {
        let mut s = AtRest::after_ready(TransactionStatus::Idle);
        assert!(s.at_rest(), "right after the startup");
        let q = msg(b'Q', b"begin\0");
        assert_eq!(s.client_bytes(&q), q.len());
        assert!(!s.at_rest(), "a query in flight");
        s.upstream_bytes(&msg(b'C', b"BEGIN\0"));
        s.upstream_bytes(&msg(b'Z', b"T"));
        assert!(!s.at_rest(), "inside a transaction");
        s.client_bytes(&msg(b'Q', b"commit\0"));
        s.upstream_bytes(&msg(b'C', b"COMMIT\0"));
        let ready = msg(b'Z', b"I");
        s.upstream_bytes(&ready[..3]);
        assert!(!s.at_rest(), "half a ReadyForQuery");
        s.upstream_bytes(&ready[3..]);
        assert!(s.at_rest(), "after COMMIT's ReadyForQuery I");
        let terminate = msg(b'X', b"");
        assert_eq!(
            s.client_bytes(&terminate),
            terminate.len(),
            "Terminate is forwarded"
        );
        assert!(!AtRest::after_ready(TransactionStatus::InTransaction).at_rest());
    }
}

#[cfg(test)]
mod size {
    use tokio::io::{BufReader, DuplexStream};

    use super::*;
    use crate::relay::{NoObserver, Transferred};
    use crate::shutdown::{Lifecycle, Phase};

    /// The drain-aware relay's state against the plain one's: the relay
    /// itself no larger; the session adds a fixed few hundred bytes (the
    /// tracker's header state, the phase watch's future), never a buffer,
    /// whatever the traffic.
    #[test]
    fn the_drain_aware_relay_holds_only_a_fixed_few_bytes_more() {
        let (mut c, _c) = tokio::io::duplex(64);
        let (u, _u) = tokio::io::duplex(64);
        let mut u: BufReader<DuplexStream> = BufReader::new(u);
        let mut moved = Transferred::default();
        let plain = std::mem::size_of_val(&relay::relay_observed(
            &mut c,
            &mut u,
            &mut moved,
            &mut NoObserver,
        ));
        let mut at_rest = AtRest::after_ready(TransactionStatus::Idle);
        let life = Lifecycle::new();
        let watch = life.watch();
        let stop = std::pin::pin!(watch.wait_for(Phase::Draining));
        let tracker = std::mem::size_of_val(&at_rest) + std::mem::size_of_val(&*stop);
        let draining = relay::relay_until_rest(&mut c, &mut u, &mut moved, &mut at_rest, stop);
        let aware = std::mem::size_of_val(&draining);
        eprintln!(
            "relay future: plain {plain} B, drain-aware {aware} B (+ tracker and phase watch {tracker} B)"
        );
        assert!(
            aware <= plain + 16 && tracker <= 320,
            "plain {plain} B, drain-aware {aware} B, tracker and phase watch {tracker} B"
        );
    }
}
