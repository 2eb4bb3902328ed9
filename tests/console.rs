//! `[[console]]` against a real HTTPS server standing in for the DB Console:
//! Debian's nginx with TLS (certificate from the test PKI) on two "nodes",
//! one ready (`/health?ready=1` → 200) and one not (503). Through sqlgate:
//! headless Chromium loads the login page, posts the form (a `Secure` session
//! cookie), follows the redirect (a `Location` naming the node's https URL)
//! and shows the page behind the login; a slow chunked response streams;
//! a client outside the console's allowlist gets 403; and the not-ready node
//! gets no request.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const TITLE: &str = "sqlgate test DB Console: overview";
const SESSION: &str = "s3cret-session";

/// What a node answers on its SQL port for the health probe: SSLRequest → S,
/// then a TLS handshake with the node certificate.
async fn fake_sql_node(ip: Ipv4Addr, tls: Arc<rustls::ServerConfig>) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0))
        .await
        .expect("bind fake SQL port");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let tls = Arc::clone(&tls);
            tokio::spawn(async move {
                let mut req = [0u8; 8];
                if s.read_exact(&mut req).await.is_err() || s.write_all(b"S").await.is_err() {
                    return;
                }
                if let Ok(mut t) = tokio_rustls::TlsAcceptor::from(tls).accept(s).await {
                    let mut sink = [0u8; 64];
                    let _ = tokio::time::timeout(Duration::from_secs(2), t.read(&mut sink)).await;
                }
            });
        }
    });
    addr
}

/// A plain-HTTP backend behind nginx: six chunks, 500 ms apart.
async fn slow_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for i in 0..6 {
                    let chunk = format!("tick {i}\n");
                    let frame = format!("{:x}\r\n{chunk}\r\n", chunk.len());
                    if s.write_all(frame.as_bytes()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                let _ = s.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    addr
}

/// nginx serving both nodes' DB Console ports.
struct Nginx {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    fn start(
        cert: &CertFiles,
        ready: Ipv4Addr,
        not_ready: Ipv4Addr,
        port: u16,
        backend: SocketAddr,
    ) -> Nginx {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path().display().to_string();
        let login = "<!doctype html><html><head><title>login</title></head><body>\
             <form method=post action=/login><input name=user value=admin></form>\
             <script>document.forms[0].submit()</script></body></html>";
        std::fs::write(dir.path().join("login.html"), login).expect("write");
        std::fs::write(
            dir.path().join("overview.html"),
            format!("<!doctype html><html><head><title>{TITLE}</title></head>\
                     <body style=\"background:#2b6cb0;color:#fff;font:32px sans-serif\">\
                     <h1 id=greeting>Logged in: cluster overview</h1><p>3 nodes live</p></body></html>"),
        )
        .expect("write");
        let tls = format!(
            "ssl_certificate {}; ssl_certificate_key {};",
            cert.cert.display(),
            cert.key.display()
        );
        let conf = format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
  client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};
  default_type text/html;
  server {{
    listen {ready}:{port} ssl; server_name localhost; {tls}
    access_log {d}/ready.log;
    root {d};
    location = /health {{ return 200 \"ok\"; }}
    location = /login.html {{ }}
    location = /login {{
      add_header Set-Cookie \"session={SESSION}; Path=/; Secure; HttpOnly\";
      return 302 https://localhost:{port}/overview;
    }}
    location = /overview {{
      if ($cookie_session != \"{SESSION}\") {{ return 403 \"not logged in\"; }}
      try_files /overview.html =404;
    }}
    location = /stream {{
      proxy_pass http://{backend}; proxy_buffering off; proxy_http_version 1.1;
    }}
  }}
  server {{
    listen {not_ready}:{port} ssl; server_name localhost; {tls}
    access_log {d}/not_ready.log;
    location = /health {{ return 503 \"draining\"; }}
    location / {{ return 200 \"WRONG NODE\"; }}
  }}
}}
"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = std::process::Command::new("/usr/sbin/nginx")
            .args([
                "-p",
                &d,
                "-c",
                &conf_path.display().to_string(),
                "-e",
                &format!("{d}/error.log"),
            ])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("nginx is required (apt-get install nginx)");
        Nginx { child, dir }
    }

    fn access_log(&self, server: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{server}.log"))).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// sqlgate in-process with a config written by the test.
struct Gate {
    consoles: Vec<SocketAddr>,
    lifecycle: sqlgate::shutdown::Lifecycle,
    task: tokio::task::JoinHandle<Result<(), sqlgate::DaemonError>>,
    _dir: tempfile::TempDir,
}

impl Gate {
    async fn start(toml: &str) -> Gate {
        init_test_logging();
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("sqlgate.toml");
        std::fs::write(&path, toml).expect("write config");
        let config =
            sqlgate::Config::load(&path).unwrap_or_else(|e| panic!("config rejected: {e}\n{toml}"));
        let daemon = sqlgate::Daemon::bind(config).await.expect("bind");
        let consoles = daemon.console_addrs();
        let lifecycle = daemon.lifecycle();
        let task = tokio::spawn(daemon.run());
        Gate {
            consoles,
            lifecycle,
            task,
            _dir: dir,
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.lifecycle.advance(sqlgate::shutdown::Phase::Stopped);
        self.task.abort();
    }
}

/// A raw HTTP/1.1 GET; returns the response head and when the first and the
/// last body bytes came.
async fn get(addr: SocketAddr, path: &str) -> (String, String, Duration, Duration) {
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect console");
    let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut all = Vec::new();
    let mut first_body = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .expect("response within 30s")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
        if first_body.is_none()
            && let Some(i) = all.windows(4).position(|w| w == b"\r\n\r\n")
            && all.len() > i + 4
        {
            first_body = Some(started.elapsed());
        }
    }
    let text = String::from_utf8_lossy(&all).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.to_owned(),
        body.to_owned(),
        first_body.unwrap_or_default(),
        started.elapsed(),
    )
}

fn chromium(url: &str, out: &Path, profile: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new("/usr/bin/chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--virtual-time-budget=8000",
        "--window-size=900,500",
        &format!("--user-data-dir={}", profile.display()),
    ]);
    if out.extension().is_some_and(|e| e == "png") {
        cmd.arg(format!("--screenshot={}", out.display()));
    } else {
        cmd.arg("--dump-dom");
    }
    cmd.arg(url);
    cmd
}

async fn run_chromium(url: String, out: PathBuf) -> String {
    tokio::task::spawn_blocking(move || {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut cmd = chromium(&url, &out, profile.path());
        cmd.stdin(std::process::Stdio::null());
        let child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("chromium is required (apt-get install chromium)");
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(Duration::from_secs(90)) {
            Ok(out) => String::from_utf8_lossy(&out.expect("chromium output").stdout).into_owned(),
            Err(_) => {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
                panic!("chromium did not finish within 90s");
            }
        }
    })
    .await
    .expect("chromium task")
}

/// The PNG's size, and whether its pixels are not all one colour (decoded
/// far enough to tell: the IHDR and a non-trivial IDAT).
fn png_is_not_blank(bytes: &[u8]) -> (u32, u32, bool) {
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let w = u32::from_be_bytes(bytes[16..20].try_into().expect("width"));
    let h = u32::from_be_bytes(bytes[20..24].try_into().expect("height"));
    // A one-colour 900x500 screenshot compresses to a few KiB; text and a
    // coloured page do not.
    (w, h, bytes.len() > 6000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_console_through_sqlgate_in_headless_chromium() {
    let pki = Pki::new("console");
    let cert = pki.issue("node", &["localhost"], Validity::Current);
    let server_tls = {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(&cert.cert)
            .expect("cert")
            .collect::<Result<Vec<_>, _>>()
            .expect("cert");
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&cert.key).expect("key");
        Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config"),
        )
    };
    let (ready_ip, not_ready_ip) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
    let sql_ready = fake_sql_node(ready_ip, Arc::clone(&server_tls)).await;
    let sql_not_ready = fake_sql_node(not_ready_ip, server_tls).await;
    let http_port = free_port();
    let nginx = Nginx::start(
        &cert,
        ready_ip,
        not_ready_ip,
        http_port,
        slow_backend().await,
    );

    // The console listener admits loopback only; the namespace host is refused.
    let outside = NetNs::create(21);
    let toml = format!(
        "[upstream]\nca_file = \"{ca}\"\n\n[health]\ninterval = \"300ms\"\ntimeout = \"2s\"\nhttp_port = {http_port}\n\n\
         [[nodes]]\nhost = \"localhost\"\nport = {}\nregion = \"a\"\naddr = \"{sql_not_ready}\"\n\n\
         [[nodes]]\nhost = \"localhost\"\nport = {}\nregion = \"a\"\naddr = \"{sql_ready}\"\n\n\
         [[console]]\naddr = \"127.0.0.1:0\"\n\n[[console]]\naddr = \"{}:0\"\nallow = [\"127.0.0.0/8\"]\n",
        sql_not_ready.port(),
        sql_ready.port(),
        outside.host_ip,
        ca = pki.ca_file().display(),
    );
    let gate = Gate::start(&toml).await;
    let (console, second) = (gate.consoles[0], gate.consoles[1]);

    // Wait (bounded) for the probes: the ready node serves the console.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (head, _, _, _) = get(console, "/login.html").await;
        if head.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "console never became ready: {head}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The redirect after login names the local address, not the node.
    let mut s = tokio::net::TcpStream::connect(console)
        .await
        .expect("connect");
    s.write_all(format!("POST /login HTTP/1.1\r\nhost: {console}\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 10\r\nconnection: close\r\n\r\nuser=admin").as_bytes()).await.expect("post");
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 302"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(
        lower.contains(&format!("location: http://{console}/overview")),
        "{answer}"
    );
    assert!(
        lower.contains("set-cookie: session=s3cret-session") && lower.contains("secure"),
        "loopback clients keep Secure: {answer}"
    );

    // Streaming: the first chunk long before the last.
    let (head, body, first, last) = get(console, "/stream").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("tick 0") && body.contains("tick 5"), "{body}");
    assert!(
        last >= Duration::from_millis(2400),
        "the stream takes its time: {last:?}"
    );
    assert!(
        last - first >= Duration::from_millis(1500),
        "first bytes at {first:?}, last at {last:?}: not buffered"
    );

    // The browser: login page → form POST → cookie → redirect → overview.
    let shots = tempfile::tempdir().expect("tmp");
    let dom = run_chromium(
        format!("http://{console}/login.html"),
        shots.path().join("dom"),
    )
    .await;
    assert!(
        dom.contains(TITLE) && dom.contains("Logged in"),
        "chromium shows: {dom}"
    );
    let png = shots.path().join("console.png");
    run_chromium(format!("http://{console}/login.html"), png.clone()).await;
    let bytes = std::fs::read(&png).expect("screenshot written");
    let (w, h, varied) = png_is_not_blank(&bytes);
    assert!(
        w >= 800 && h >= 400 && varied,
        "{w}x{h}, {} bytes",
        bytes.len()
    );
    if std::env::var_os("SQLGATE_KEEP_SCREENSHOT").is_some() {
        std::fs::copy(
            &png,
            concat!(env!("CARGO_MANIFEST_DIR"), "/docs/console.png"),
        )
        .expect("keep");
    }
    let log = nginx.access_log("ready");
    assert!(
        log.contains("\"GET /overview HTTP/1.1\" 200"),
        "overview served behind the cookie: {log}"
    );

    // Outside the allowlist: 403 from sqlgate, nothing forwarded.
    let out = outside
        .run(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{second}/login.html"),
            ],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "403",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The not-ready node got health checks only.
    let not_ready_log = nginx.access_log("not_ready");
    assert!(
        not_ready_log.contains("/health"),
        "the not-ready node was probed: {not_ready_log}"
    );
    let not_ready_requests: Vec<&str> = not_ready_log
        .lines()
        .filter(|l| !l.contains("GET /health?ready=1 "))
        .collect();
    assert!(not_ready_requests.is_empty(), "{not_ready_requests:?}");
    drop(gate);
}
