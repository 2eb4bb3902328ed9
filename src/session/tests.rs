//! Session-level timeouts and cuts under paused time: the client and the node
//! are in-memory streams (the node behind a [`Dialer`] of the test's), so a
//! 30-second startup deadline or a drain's grace takes no real time and every
//! run is the same.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream, duplex};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::cancel::CancelTable;
use crate::config::NodeConfig;
use crate::shutdown::Lifecycle;
use crate::upstream::{Connection, UpstreamError};

/// How the in-memory node behaves after it reads the StartupMessage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    /// AuthenticationOk, ReadyForQuery, then answers simple queries until
    /// the other side closes (see [`answer_queries`]).
    Serve,
    /// Never answers.
    Silent,
}

/// Dials in-memory nodes and counts the dials and the Terminates they got.
struct MemoryDialer {
    node: Node,
    dials: Arc<AtomicUsize>,
    terminates: Arc<AtomicUsize>,
}

/// A backend message.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The node's side of a session after its ReadyForQuery: each Query gets a
/// CommandComplete and a ReadyForQuery (`begin` opens a transaction, `commit`
/// ends it, `sleep N` answers after N seconds); Terminate is counted.
async fn answer_queries(node: &mut DuplexStream, terminates: &AtomicUsize) {
    let mut status = b'I';
    loop {
        let mut header = [0u8; 5];
        if node.read_exact(&mut header).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        if node.read_exact(&mut body).await.is_err() {
            return;
        }
        match header[0] {
            b'X' => {
                terminates.fetch_add(1, Ordering::Relaxed);
                return;
            }
            b'Q' => {
                let sql = String::from_utf8_lossy(&body)
                    .trim_end_matches('\0')
                    .to_owned();
                if let Some(secs) = sql.strip_prefix("sleep ") {
                    let secs = secs.parse().expect("sleep N");
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                }
                status = match sql.as_str() {
                    "begin" => b'T',
                    "commit" => b'I',
                    _ => status,
                };
                let mut answer = message(b'C', b"OK\0");
                answer.extend(message(b'Z', &[status]));
                if node.write_all(&answer).await.is_err() {
                    return;
                }
            }
            _ => {}
        }
    }
}

impl Dialer for MemoryDialer {
    type Stream = BufReader<DuplexStream>;

    fn dial(
        &self,
        _node: &NodeConfig,
        _cfg: &crate::config::UpstreamConfig,
        _tls: &Arc<rustls::ClientConfig>,
    ) -> impl std::future::Future<Output = Result<Connection<Self::Stream>, UpstreamError>> + Send
    {
        self.dials.fetch_add(1, Ordering::Relaxed);
        let (ours, mut theirs) = duplex(64 * 1024);
        let node = self.node;
        let terminates = Arc::clone(&self.terminates);
        tokio::spawn(async move {
            let mut len = [0u8; 4];
            if theirs.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut rest = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
            if theirs.read_exact(&mut rest).await.is_err() {
                return;
            }
            if node == Node::Serve {
                let mut hello = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0];
                hello.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
                if theirs.write_all(&hello).await.is_err() {
                    return;
                }
                return answer_queries(&mut theirs, &terminates).await;
            }
            // Hold the session until sqlgate closes it.
            let mut sink = Vec::new();
            let _ = theirs.read_to_end(&mut sink).await;
        });
        std::future::ready(Ok(Connection {
            stream: BufReader::new(ours),
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            elapsed: Duration::ZERO,
            round_trip: Duration::ZERO,
        }))
    }
}

/// A context for one session: a config with one node (never dialed for real),
/// its router, cancel table and lifecycle.
struct Fixture {
    _dir: tempfile::TempDir,
    ctx: SessionContext,
    lifecycle: Lifecycle,
    kill: CancellationToken,
}

fn fixture(extra: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&key).expect("ca");
    std::fs::write(dir.path().join("ca.crt"), ca.pem()).expect("write ca");
    let path: PathBuf = dir.path().join("sqlgate.toml");
    let text = format!(
        "[upstream]\nca_file = \"ca.crt\"\n{extra}\n[[nodes]]\nhost = \"localhost\"\nport = 1\nregion = \"local\"\n"
    );
    let config = Arc::new(Config::parse(&text, &path).expect("valid test config"));
    let lifecycle = Lifecycle::new();
    let kill = CancellationToken::new();
    let ctx = SessionContext {
        id: 1,
        router: Arc::new(Router::new(&config.nodes, &config.routing, &config.health)),
        config,
        listener: Arc::from("test"),
        allow: None,
        cancels: Arc::new(CancelTable::new()),
        pool: crate::pool::Pool::new(),
        tls: None,
        peer_users: None,
        peer_uid: None,
        kill: kill.clone(),
        lifecycle: lifecycle.watch(),
    };
    Fixture {
        _dir: dir,
        ctx,
        lifecycle,
        kill,
    }
}

fn startup_message() -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0app\0database\0app\0\0");
    let mut out = (body.len() as u32 + 4).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// Reads what the client gets until EOF; the SQLSTATE of the first
/// ErrorResponse in it, if any.
async fn client_sees(client: &mut DuplexStream) -> (Vec<u8>, Option<String>) {
    let mut got = Vec::new();
    let _ = client.read_to_end(&mut got).await;
    let code = got
        .windows(7)
        .find(|w| w[0] == 0 && w[1] == b'C')
        .map(|w| String::from_utf8_lossy(&w[2..7]).into_owned());
    (got, code)
}

fn dialer(node: Node) -> (MemoryDialer, Arc<AtomicUsize>) {
    let dials = Arc::new(AtomicUsize::new(0));
    (
        MemoryDialer {
            node,
            dials: Arc::clone(&dials),
            terminates: Arc::new(AtomicUsize::new(0)),
        },
        dials,
    )
}

#[tokio::test(start_paused = true)]
async fn a_client_silent_past_the_startup_timeout_is_closed_silently_and_nothing_is_dialed() {
    let f = fixture("");
    let (mut client, ours) = duplex(4096);
    let (dialer, dials) = dialer(Node::Serve);
    let started = tokio::time::Instant::now();
    serve_with(f.ctx, ours, None, &dialer).await;
    let waited = started.elapsed();
    assert_eq!(
        waited,
        Duration::from_secs(10),
        "limits.startup_timeout decides"
    );
    let (got, _) = client_sees(&mut client).await;
    assert!(
        got.is_empty(),
        "closed without a word, as PostgreSQL does: {got:?}"
    );
    assert_eq!(dials.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn a_node_silent_after_tls_past_the_upstream_startup_timeout_gets_the_client_08006() {
    let f = fixture("startup_timeout = \"30s\"\n");
    let (mut client, ours) = duplex(4096);
    let (dialer, dials) = dialer(Node::Silent);
    client.write_all(&startup_message()).await.expect("startup");
    let started = tokio::time::Instant::now();
    serve_with(f.ctx, ours, None, &dialer).await;
    assert_eq!(started.elapsed(), Duration::from_secs(30));
    let (got, code) = client_sees(&mut client).await;
    assert_eq!(code.as_deref(), Some("08006"), "{got:?}");
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("did not answer the StartupMessage within 30s"),
        "{text}"
    );
    assert_eq!(dials.load(Ordering::Relaxed), 1, "one node, dialed once");
}

#[tokio::test(start_paused = true)]
async fn a_killed_session_ends_at_once_and_the_client_sees_the_close() {
    let f = fixture("");
    let (mut client, ours) = duplex(4096);
    let (dialer, _) = dialer(Node::Serve);
    client.write_all(&startup_message()).await.expect("startup");
    let kill = f.kill.clone();
    let session = tokio::spawn(async move { serve_with(f.ctx, ours, None, &dialer).await });
    let mut ready = [0u8; 15];
    client
        .read_exact(&mut ready)
        .await
        .expect("AuthenticationOk and ReadyForQuery");
    assert_eq!(ready[9], b'Z');
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(!session.is_finished(), "an idle session lives on");
    kill.cancel();
    tokio::time::timeout(Duration::from_secs(1), session)
        .await
        .expect("a killed session ends at once")
        .expect("no panic");
    let (rest, _) = client_sees(&mut client).await;
    assert!(rest.is_empty(), "nothing after the cut: {rest:?}");
}

#[tokio::test(start_paused = true)]
async fn a_drain_refuses_newcomers_with_57p01_and_cuts_the_rest_when_its_grace_ends() {
    let f = fixture("");
    let (mut running, ours) = duplex(4096);
    let (dialer, dials) = dialer(Node::Serve);
    running
        .write_all(&startup_message())
        .await
        .expect("startup");
    let ctx = f.ctx.clone();
    let session = tokio::spawn(async move { serve_with(ctx, ours, None, &dialer).await });
    let mut ready = [0u8; 15];
    running.read_exact(&mut ready).await.expect("ready");
    running.write_all(&query("begin")).await.expect("begin");
    let mut in_transaction = [0u8; 14];
    running
        .read_exact(&mut in_transaction)
        .await
        .expect("BEGIN");
    assert_eq!(in_transaction[13], b'T');

    f.lifecycle.drain();
    let (mut newcomer, theirs) = duplex(4096);
    newcomer
        .write_all(&startup_message())
        .await
        .expect("startup");
    let (second, _) = super::tests::dialer(Node::Serve);
    serve_with(f.ctx.clone(), theirs, None, &second).await;
    let (_, code) = client_sees(&mut newcomer).await;
    assert_eq!(code.as_deref(), Some("57P01"));
    assert_eq!(
        dials.load(Ordering::Relaxed),
        1,
        "the newcomer dialed nothing"
    );

    tokio::time::sleep(Duration::from_secs(25)).await;
    assert!(
        !session.is_finished(),
        "a session in a transaction keeps its grace"
    );
    f.lifecycle.advance(Phase::Cutting);
    tokio::time::timeout(Duration::from_secs(1), session)
        .await
        .expect("cut at once when the grace is over")
        .expect("no panic");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_closes_ends_the_session_within_the_close_grace_though_the_node_stays() {
    let f = fixture("");
    let (mut client, ours) = duplex(4096);
    let (dialer, _) = dialer(Node::Serve);
    client.write_all(&startup_message()).await.expect("startup");
    let session = tokio::spawn(async move { serve_with(f.ctx, ours, None, &dialer).await });
    let mut ready = [0u8; 15];
    client.read_exact(&mut ready).await.expect("ready");
    let started = tokio::time::Instant::now();
    client.shutdown().await.expect("the client closes");
    tokio::time::timeout(Duration::from_secs(60), session)
        .await
        .expect("the session ends")
        .expect("no panic");
    assert!(
        started.elapsed() <= relay::CLOSE_GRACE,
        "ended within the close grace: {:?}",
        started.elapsed()
    );
}

fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

/// Splits what the client got into (tag, body) messages.
fn messages(mut wire: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while wire.len() >= 5 {
        let len = u32::from_be_bytes([wire[1], wire[2], wire[3], wire[4]]) as usize;
        out.push((wire[0], wire[5..1 + len].to_vec()));
        wire = &wire[1 + len..];
    }
    assert!(wire.is_empty(), "whole messages only: {wire:?}");
    out
}

/// A session through to its first ReadyForQuery; its task and the dialer's
/// Terminate count.
async fn ready_session(
    f: &Fixture,
) -> (DuplexStream, tokio::task::JoinHandle<()>, Arc<AtomicUsize>) {
    let (mut client, ours) = duplex(4096);
    let (dialer, _) = dialer(Node::Serve);
    let terminates = Arc::clone(&dialer.terminates);
    client.write_all(&startup_message()).await.expect("startup");
    let ctx = f.ctx.clone();
    let session = tokio::spawn(async move { serve_with(ctx, ours, None, &dialer).await });
    let mut ready = [0u8; 15];
    client.read_exact(&mut ready).await.expect("ready");
    assert_eq!(&ready[9..], &[b'Z', 0, 0, 0, 5, b'I']);
    (client, session, terminates)
}

#[tokio::test(start_paused = true)]
async fn a_drain_closes_an_idle_session_at_once_with_57p01_and_terminates_the_server_session() {
    let f = fixture("");
    let (mut client, session, terminates) = ready_session(&f).await;
    client.write_all(&query("select 1")).await.expect("query");
    let mut answer = [0u8; 14];
    client.read_exact(&mut answer).await.expect("answer");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(
        !session.is_finished(),
        "idle sessions live on while serving"
    );

    f.lifecycle.drain();
    tokio::time::timeout(Duration::from_millis(100), session)
        .await
        .expect("an idle session is closed at once")
        .expect("no panic");
    let (got, code) = client_sees(&mut client).await;
    assert_eq!(code.as_deref(), Some("57P01"), "{got:?}");
    let got = messages(&got);
    assert_eq!(got.len(), 1, "only the FATAL, then the close: {got:?}");
    assert!(String::from_utf8_lossy(&got[0].1).contains("FATAL"));
    tokio::task::yield_now().await;
    assert_eq!(
        terminates.load(Ordering::Relaxed),
        1,
        "the node got Terminate"
    );
}

#[tokio::test(start_paused = true)]
async fn a_drain_lets_a_transaction_finish_and_closes_the_session_after_its_commit() {
    let f = fixture("");
    let (mut client, session, terminates) = ready_session(&f).await;
    client.write_all(&query("begin")).await.expect("begin");
    let mut begun = [0u8; 14];
    client.read_exact(&mut begun).await.expect("BEGIN");

    f.lifecycle.drain();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!session.is_finished(), "a transaction keeps the grace");
    client
        .write_all(&query("select 1"))
        .await
        .expect("more work");
    let mut more = [0u8; 14];
    client.read_exact(&mut more).await.expect("still served");
    assert_eq!(more[13], b'T');
    client.write_all(&query("commit")).await.expect("commit");
    tokio::time::timeout(Duration::from_millis(100), session)
        .await
        .expect("closed as soon as the commit is answered")
        .expect("no panic");
    let (got, code) = client_sees(&mut client).await;
    let got = messages(&got);
    assert_eq!(
        got.iter().map(|(tag, _)| *tag).collect::<Vec<_>>(),
        [b'C', b'Z', b'E'],
        "the commit's answer whole, then the FATAL: {got:?}"
    );
    assert_eq!(got[1].1, b"I");
    assert_eq!(code.as_deref(), Some("57P01"));
    tokio::task::yield_now().await;
    assert_eq!(terminates.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn a_drain_lets_a_query_in_flight_finish_and_deliver_its_answer() {
    let f = fixture("");
    let (mut client, session, _) = ready_session(&f).await;
    client.write_all(&query("sleep 20")).await.expect("query");
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.lifecycle.drain();
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(!session.is_finished(), "a query in flight keeps the grace");
    tokio::time::timeout(Duration::from_secs(10), session)
        .await
        .expect("closed once the answer is out")
        .expect("no panic");
    let (got, code) = client_sees(&mut client).await;
    let got = messages(&got);
    assert_eq!(
        got.iter().map(|(tag, _)| *tag).collect::<Vec<_>>(),
        [b'C', b'Z', b'E'],
        "{got:?}"
    );
    assert_eq!(code.as_deref(), Some("57P01"));
}

/// The session task is allocated once, at the size of its largest state, and
/// lives as long as its client: what only the startup needs (the upstream
/// TLS session on its way to the relay, the TLS handshake with the client,
/// the peer lookup) is boxed, so an idle session's task stays small. Inline,
/// they made it 8.6 KiB (`benches/compare.sh`: 25.6 KiB per idle session).
#[tokio::test]
async fn the_session_task_stays_small() {
    let f = fixture("");
    let (_client, ours) = duplex(64);
    let task = serve(f.ctx.clone(), ours, None);
    let size = std::mem::size_of_val(&task);
    eprintln!("session future: {size} B");
    assert!(size <= 2048, "the session future is {size} B");
    assert!(
        std::mem::size_of::<crate::upstream::UpstreamStream>() > 1024,
        "the upstream TLS session is the large part this guards against"
    );
}
