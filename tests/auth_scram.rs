//! Pooling's authentication (issue 13) against a real PostgreSQL 15 with TLS
//! and SCRAM: sqlgate's SCRAM server recovers a client's ClientKey against
//! the role's `pg_authid.rolpassword`, and sqlgate's SCRAM client logs in to
//! the node with that ClientKey alone; a secret in `auth_file` that differs
//! from the node's gives the error that says so. libpq (`psql`) is the client
//! of sqlgate's SCRAM server in the tests that need a real one.

mod common;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use common::bounded;
use common::{BackendMessage, NodeTls, PgNode, Pki, clear_libpq_env, parse_error_fields, wire};
use rustls::pki_types::ServerName;
use sqlgate::auth::messages::split_message;
use sqlgate::auth::{
    ClientKey, ClientStep, Credential, Password, ScramClient, ScramClientError, ScramSecret,
    ScramServer, ScramServerError, ServerStep, Userlist,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

const USER: &str = "pooled";
const PASSWORD: &str = "pencil";

/// A PostgreSQL 15 node (TLS, SCRAM) with role `pooled`, password `pencil`,
/// and that role's SCRAM secret as `pg_authid` holds it.
async fn node_with_role(pki: &Pki) -> (PgNode, String) {
    let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
    node.admin_sql(&format!(
        "set password_encryption = 'scram-sha-256'; create role {USER} login password '{PASSWORD}'"
    ))
    .await;
    let secret = node
        .admin_sql(&format!(
            "select rolpassword from pg_authid where rolname = '{USER}'"
        ))
        .await;
    assert!(secret.starts_with("SCRAM-SHA-256$4096:"), "{secret}");
    (node, secret)
}

/// The `auth_file` entry of [`USER`] with `secret`.
fn userlist(secret: &str) -> Userlist {
    let text = format!("# test auth_file\n\"{USER}\" \"{secret}\"\n");
    Userlist::parse(&text, Path::new("userlist.txt")).expect("auth_file parses")
}

/// A client with `password` authenticates to sqlgate's SCRAM server, in
/// memory; returns the ClientKey sqlgate recovered, or the server's refusal.
fn client_logs_in_to_sqlgate(secret: &ScramSecret, password: &str) -> ClientKey {
    let mut server = ScramServer::new(secret);
    let mut client = ScramClient::new(Credential::Password(Password::new(password)));
    let mut to_client = server.auth_request();
    let mut recovered = None;
    while !to_client.is_empty() {
        let (tag, body, rest) = split_message(&to_client).expect("whole messages");
        assert_eq!(tag, b'R');
        let step = client.receive(body).expect("sqlgate's server speaks SCRAM");
        to_client = rest.to_vec();
        match step {
            ClientStep::Send(bytes) => {
                let (_, body, _) = split_message(&bytes).expect("whole message");
                match server.receive(body).expect("sqlgate accepts the password") {
                    ServerStep::Continue(next) => to_client = next,
                    ServerStep::Authenticated {
                        messages,
                        client_key,
                    } => {
                        recovered = Some(client_key);
                        to_client = messages;
                    }
                }
            }
            ClientStep::Verified => {}
            ClientStep::Authenticated => break,
        }
    }
    recovered.expect("the exchange ended with a ClientKey")
}

/// SSLRequest, `S`, and a verified TLS handshake with the node as `localhost`.
async fn tls_connect(node: &PgNode, pki: &Pki) -> TlsStream<TcpStream> {
    let mut tcp = TcpStream::connect(node.addr()).await.expect("connect");
    tcp.write_all(&wire::ssl_request())
        .await
        .expect("SSLRequest");
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .expect("answer to SSLRequest");
    assert_eq!(answer[0], b'S');
    tokio_rustls::TlsConnector::from(pki.client_config())
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("verified TLS handshake")
}

/// One message; EOF is an error here.
async fn read_message(stream: &mut (impl AsyncRead + Unpin)) -> io::Result<BackendMessage> {
    let (tag, body) = common::read_message(stream)
        .await?
        .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
    Ok(BackendMessage { tag, body })
}

/// Opens a server session as [`USER`] with `credential`, the way a pool
/// would: StartupMessage, then sqlgate's SCRAM client answers every
/// Authentication message, until ReadyForQuery. Returns the session.
async fn open_server_session(
    node: &PgNode,
    pki: &Pki,
    credential: Credential,
) -> Result<TlsStream<TcpStream>, ScramClientError> {
    let mut stream = tls_connect(node, pki).await;
    stream
        .write_all(&wire::startup_message(&[
            ("user", USER),
            ("database", "postgres"),
        ]))
        .await
        .expect("StartupMessage");
    let mut client = ScramClient::new(credential);
    let mut authenticated = false;
    loop {
        let message = read_message(&mut stream).await.expect("server message");
        match message.tag {
            b'R' => match client.receive(&message.body)? {
                ClientStep::Send(bytes) => stream.write_all(&bytes).await.expect("write"),
                ClientStep::Verified => {}
                ClientStep::Authenticated => authenticated = true,
            },
            b'E' => {
                let fields = parse_error_fields(&message.body);
                return Err(client.server_rejected(&fields.code));
            }
            b'Z' => {
                assert!(authenticated, "ReadyForQuery after AuthenticationOk");
                return Ok(stream);
            }
            _ => {}
        }
    }
}

/// Runs `select current_user` on a ready session; returns the value.
async fn current_user(stream: &mut TlsStream<TcpStream>) -> String {
    stream
        .write_all(&wire::query("select current_user"))
        .await
        .expect("Query");
    let mut user = None;
    loop {
        let message = read_message(stream).await.expect("server message");
        match message.tag {
            // DataRow: Int16 columns, Int32 length, value.
            b'D' => user = Some(String::from_utf8_lossy(&message.body[6..]).into_owned()),
            b'E' => panic!("query failed: {:?}", parse_error_fields(&message.body)),
            b'Z' => return user.expect("one row"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_key_recovered_from_a_client_logs_in_to_postgres() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("auth-scram");
        let (node, rolpassword) = node_with_role(&pki).await;
        let list = userlist(&rolpassword);
        let entry = list.get(USER).expect("pooled user");

        let client_key = client_logs_in_to_sqlgate(entry.client_secret(), PASSWORD);
        let credential = entry.upstream_credential(client_key);
        assert!(matches!(credential, Credential::ClientKey { .. }));
        let mut session = open_server_session(&node, &pki, credential)
            .await
            .expect("the node accepts the recovered ClientKey");
        assert_eq!(current_user(&mut session).await, USER);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_that_differs_from_the_servers_gives_a_clear_error() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("auth-scram-differs");
        let (node, rolpassword) = node_with_role(&pki).await;
        let cluster = ScramSecret::parse(&rolpassword).expect("pg_authid secret parses");
        let password = Password::new(PASSWORD);

        // Same password, another salt (e.g. the role's password was set again).
        let resalted = ScramSecret::generate(&password);
        // Same salt and iterations, another password.
        let other = ScramSecret::from_password(
            &Password::new("not pencil"),
            cluster.salt(),
            cluster.iterations(),
        );
        let cases = [(resalted, PASSWORD), (other, "not pencil")];
        assert!(!cases.is_empty());
        for (file_secret, client_password) in cases {
            let entry_list = userlist(&file_secret.to_secret_string());
            let entry = entry_list.get(USER).expect("pooled user");
            let client_key = client_logs_in_to_sqlgate(entry.client_secret(), client_password);
            let err = open_server_session(&node, &pki, entry.upstream_credential(client_key))
                .await
                .expect_err("the node refuses a ClientKey of another secret");
            assert_eq!(err, ScramClientError::SecretDiffers);
            assert!(
                err.to_string()
                    .contains("the SCRAM secret in auth_file differs from the cluster's"),
                "{err}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_entry_logs_in_with_the_password() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("auth-scram-password");
        let (node, _) = node_with_role(&pki).await;
        let list = userlist(PASSWORD);
        let entry = list.get(USER).expect("pooled user");
        // sqlgate checks clients against its own derived secret…
        let client_key = client_logs_in_to_sqlgate(entry.client_secret(), PASSWORD);
        // …and logs in to the node with the password itself.
        let credential = entry.upstream_credential(client_key);
        assert!(matches!(credential, Credential::Password(_)));
        let mut session = open_server_session(&node, &pki, credential)
            .await
            .expect("the node accepts the password");
        assert_eq!(current_user(&mut session).await, USER);

        let err = open_server_session(&node, &pki, Credential::Password(Password::new("wrong")))
            .await
            .expect_err("a wrong password is refused");
        assert_eq!(err, ScramClientError::PasswordRejected("28P01".into()));
    })
    .await;
}

/// A FATAL ErrorResponse with `code` and `message`.
fn fatal(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = vec![b'E'];
    out.extend_from_slice(&u32::try_from(body.len() + 4).expect("small").to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// A stand-in for sqlgate's pooled listener: accepts one plaintext client,
/// runs sqlgate's SCRAM server against `secret`, and returns the ClientKey it
/// recovered once the client, having checked sqlgate's server signature,
/// sends its first query; or the server's refusal, sent to the client as
/// FATAL with its SQLSTATE.
async fn one_client_scram_listener(
    secret: ScramSecret,
) -> (SocketAddr, JoinHandle<Result<ClientKey, ScramServerError>>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let len = stream.read_u32().await.expect("startup length");
        let mut startup = vec![0u8; usize::try_from(len).expect("fits") - 4];
        stream.read_exact(&mut startup).await.expect("startup");
        assert_eq!(&startup[..4], &196_608u32.to_be_bytes(), "protocol 3.0");
        let mut server = ScramServer::new(&secret);
        stream
            .write_all(&server.auth_request())
            .await
            .expect("write");
        loop {
            let message = read_message(&mut stream).await.expect("client message");
            assert_eq!(message.tag, b'p', "a SASL response");
            match server.receive(&message.body) {
                Ok(ServerStep::Continue(bytes)) => stream.write_all(&bytes).await.expect("write"),
                Ok(ServerStep::Authenticated {
                    mut messages,
                    client_key,
                }) => {
                    messages.extend_from_slice(b"Z\0\0\0\x05I");
                    stream.write_all(&messages).await.expect("write");
                    let next = read_message(&mut stream).await.expect("client message");
                    assert_eq!(
                        next.tag, b'Q',
                        "libpq accepted the exchange and sent its query"
                    );
                    let bye = fatal("57P01", "sqlgate test: authentication checked");
                    stream.write_all(&bye).await.expect("write");
                    return Ok(client_key);
                }
                Err(e) => {
                    let refusal = fatal(e.sqlstate(), &e.client_message(USER));
                    stream.write_all(&refusal).await.expect("write");
                    return Err(e);
                }
            }
        }
    });
    (addr, task)
}

/// `psql -c 'select 1'` as [`USER`] with `password` at `addr`, no TLS;
/// returns its stderr.
async fn psql_as_user(addr: SocketAddr, password: &str) -> String {
    let mut cmd = tokio::process::Command::new("psql");
    clear_libpq_env(&mut cmd);
    let conninfo = format!(
        "host={} port={} user={USER} dbname=postgres sslmode=disable connect_timeout=10",
        addr.ip(),
        addr.port()
    );
    cmd.env("PGPASSWORD", password)
        .args(["-X", "-A", "-t", "-d", &conninfo, "-c", "select 1"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("psql finishes")
        .expect("run psql");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq_authenticates_to_sqlgate_and_its_client_key_logs_in_to_postgres() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("auth-scram-libpq");
        let (node, rolpassword) = node_with_role(&pki).await;
        let list = userlist(&rolpassword);
        let entry = list.get(USER).expect("pooled user");

        let (addr, listener) = one_client_scram_listener(entry.client_secret().clone()).await;
        let stderr = psql_as_user(addr, PASSWORD).await;
        let client_key = listener
            .await
            .expect("listener task")
            .unwrap_or_else(|e| panic!("sqlgate refused libpq: {e}; psql: {stderr}"));
        assert!(stderr.contains("authentication checked"), "{stderr}");

        let mut session = open_server_session(&node, &pki, entry.upstream_credential(client_key))
            .await
            .expect("the node accepts the ClientKey recovered from libpq");
        assert_eq!(current_user(&mut session).await, USER);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq_with_a_wrong_password_gets_28p01_from_sqlgate() {
    bounded(Duration::from_secs(60), async {
        let secret = ScramSecret::generate(&Password::new(PASSWORD));
        let (addr, listener) = one_client_scram_listener(secret).await;
        let stderr = psql_as_user(addr, "not pencil").await;
        let outcome = listener.await.expect("listener task");
        assert_eq!(outcome.unwrap_err(), ScramServerError::WrongPassword);
        assert!(
            stderr.contains("sqlgate: password authentication failed for user \"pooled\""),
            "{stderr}"
        );
    })
    .await;
}
