//! The raw wire protocol: hand-built packets ([`wire`]), one backend-message
//! reader ([`read_message`]), a client for what drivers will not send
//! ([`RawClient`]), and a raw startup and simple query over a plain stream
//! ([`raw_startup`], [`simple_query`]).

use super::*;

/// Frontend packets built by hand.
pub mod wire {
    /// Protocol 3.0 in a StartupMessage.
    pub const PROTOCOL_3_0: u32 = 196_608;
    /// SSLRequest code (1234 << 16 | 5679).
    pub const SSL_REQUEST_CODE: u32 = 80_877_103;
    /// GSSENCRequest code (1234 << 16 | 5680).
    pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;

    /// An 8-byte SSLRequest.
    pub fn ssl_request() -> Vec<u8> {
        special_request(SSL_REQUEST_CODE)
    }

    /// An 8-byte GSSENCRequest.
    pub fn gssenc_request() -> Vec<u8> {
        special_request(GSSENC_REQUEST_CODE)
    }

    fn special_request(code: u32) -> Vec<u8> {
        let mut packet = 8u32.to_be_bytes().to_vec();
        packet.extend_from_slice(&code.to_be_bytes());
        packet
    }

    /// A protocol 3.0 StartupMessage with `params` (e.g. user, database).
    pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
        for (key, value) in params {
            body.extend_from_slice(key.as_bytes());
            body.push(0);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        let len = u32::try_from(body.len() + 4).expect("startup message fits in u32");
        let mut packet = len.to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        packet
    }

    /// StartupMessage for user `app`, database `app`.
    pub fn app_startup() -> Vec<u8> {
        startup_message(&[("user", super::APP_USER), ("database", super::APP_DB)])
    }

    /// Protocol 3.2 in a StartupMessage (PostgreSQL 18: long cancel keys).
    pub const PROTOCOL_3_2: u32 = 196_610;
    /// CancelRequest code (1234 << 16 | 5678).
    pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

    /// A StartupMessage with protocol `version` (e.g. [`PROTOCOL_3_2`]) and `params`.
    pub fn startup_message_version(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
        let mut packet = startup_message(params);
        packet[4..8].copy_from_slice(&version.to_be_bytes());
        packet
    }

    /// A CancelRequest for backend `pid` with `key` (4 bytes in 3.0, up to 256 in 3.2).
    pub fn cancel_request(pid: u32, key: &[u8]) -> Vec<u8> {
        let len = u32::try_from(12 + key.len()).expect("cancel request fits in u32");
        let mut packet = len.to_be_bytes().to_vec();
        packet.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        packet.extend_from_slice(&pid.to_be_bytes());
        packet.extend_from_slice(key);
        packet
    }

    /// A simple Query message.
    pub fn query(sql: &str) -> Vec<u8> {
        let len = u32::try_from(4 + sql.len() + 1).expect("query fits in u32");
        let mut packet = vec![b'Q'];
        packet.extend_from_slice(&len.to_be_bytes());
        packet.extend_from_slice(sql.as_bytes());
        packet.push(0);
        packet
    }

    /// A Terminate message.
    pub fn terminate() -> Vec<u8> {
        vec![b'X', 0, 0, 0, 4]
    }

    /// A backend (or frontend) message: tag, length, body.
    pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len() + 4).expect("message fits in u32");
        let mut out = vec![tag];
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(body);
        out
    }
}

/// Reads one message (tag, body without the length) from `s`; `Ok(None)` at
/// EOF before its first byte.
///
/// # Errors
/// I/O errors, EOF inside a message, a length under 4 or over 1 MiB.
pub async fn read_message<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut header = [0u8; 5];
    match s.read_exact(&mut header[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    s.read_exact(&mut header[1..]).await?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if !(4..=1 << 20).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("backend message {:?} with length {len}", header[0] as char),
        ));
    }
    let mut body = vec![0u8; len as usize - 4];
    s.read_exact(&mut body).await?;
    Ok(Some((header[0], body)))
}

/// One backend message: type byte and body (without the length).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendMessage {
    pub tag: u8,
    pub body: Vec<u8>,
}

/// The fields of an ErrorResponse that tests look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorFields {
    /// Non-localised severity (`V`), or `S` when `V` is absent.
    pub severity: String,
    /// SQLSTATE (`C`).
    pub code: String,
    /// Message (`M`).
    pub message: String,
}

/// Parses an ErrorResponse (or NoticeResponse) body.
pub fn parse_error_fields(body: &[u8]) -> ErrorFields {
    let mut fields = ErrorFields {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
    };
    let mut localized_severity = String::new();
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match kind {
            b'V' => fields.severity = value,
            b'S' => localized_severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    if fields.severity.is_empty() {
        fields.severity = localized_severity;
    }
    fields
}

/// What a client saw first after sending its packet(s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An ErrorResponse.
    Error(ErrorFields),
    /// Any other backend message (e.g. `R` authentication request).
    Message(BackendMessage),
    /// EOF or connection reset before any message.
    Closed,
    /// Nothing within the deadline.
    TimedOut,
}

impl Outcome {
    /// True for `Error` with this severity and SQLSTATE.
    pub fn is_error(&self, severity: &str, code: &str) -> bool {
        matches!(self, Outcome::Error(e) if e.severity == severity && e.code == code)
    }
}

/// A TCP client speaking the wire protocol by hand.
pub struct RawClient {
    pub stream: TcpStream,
}

impl RawClient {
    /// Connects to `addr` within 10s.
    pub async fn connect(addr: SocketAddr) -> io::Result<RawClient> {
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(RawClient { stream })
    }

    /// Connects to `addr` from `local_ip` (e.g. 127.0.0.2) within 10s.
    pub async fn connect_from(local_ip: IpAddr, addr: SocketAddr) -> io::Result<RawClient> {
        let socket = match local_ip {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(local_ip, 0))?;
        let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(RawClient { stream })
    }

    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Half-closes: no more bytes from the client.
    pub async fn half_close(&mut self) -> io::Result<()> {
        self.stream.shutdown().await
    }

    /// Reads one byte (e.g. the answer to SSLRequest); `None` at EOF.
    pub async fn read_byte(&mut self, timeout: Duration) -> io::Result<Option<u8>> {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(timeout, self.stream.read(&mut byte)).await {
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no byte in time")),
            Ok(Ok(0)) => Ok(None),
            Ok(Ok(_)) => Ok(Some(byte[0])),
            Ok(Err(e)) => Err(e),
        }
    }

    /// Consumes the next byte if it is `byte` (e.g. an `N` answer to
    /// SSLRequest that may precede an error), waiting up to `timeout` for it.
    pub async fn skip_byte_if(&mut self, byte: u8, timeout: Duration) {
        let mut next = [0u8; 1];
        if let Ok(Ok(1)) = tokio::time::timeout(timeout, self.stream.peek(&mut next)).await
            && next[0] == byte
        {
            let _ = self.stream.read_exact(&mut next).await;
        }
    }

    /// Reads one backend message; `Ok(None)` at EOF (see [`read_message`]).
    pub async fn read_message(&mut self) -> io::Result<Option<BackendMessage>> {
        Ok(read_message(&mut self.stream)
            .await?
            .map(|(tag, body)| BackendMessage { tag, body }))
    }

    /// Reads messages until ReadyForQuery (included) or an ErrorResponse,
    /// within `timeout` in all.
    ///
    /// # Errors
    /// EOF, I/O errors, or the timeout.
    pub async fn read_until_ready(&mut self, timeout: Duration) -> io::Result<Vec<BackendMessage>> {
        let read = async {
            let mut messages = Vec::new();
            loop {
                let Some(msg) = self.read_message().await? else {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("closed after {messages:?}"),
                    ));
                };
                let done = msg.tag == b'Z' || msg.tag == b'E';
                messages.push(msg);
                if done {
                    return Ok(messages);
                }
            }
        };
        tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no ReadyForQuery in time"))?
    }

    /// The first thing that arrives within `timeout`: an ErrorResponse, some
    /// other message, or a close (EOF or reset).
    pub async fn outcome(&mut self, timeout: Duration) -> Outcome {
        match tokio::time::timeout(timeout, self.read_message()).await {
            Err(_) => Outcome::TimedOut,
            Ok(Ok(None)) => Outcome::Closed,
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                Outcome::Closed
            }
            Ok(Err(e)) => panic!("reading a backend message: {e}"),
            Ok(Ok(Some(msg))) if msg.tag == b'E' => Outcome::Error(parse_error_fields(&msg.body)),
            Ok(Ok(Some(msg))) => Outcome::Message(msg),
        }
    }
}

/// Connects (from `local_ip` when given), sends the `app` StartupMessage and
/// returns the first answer within 20s.
pub async fn startup_outcome(addr: SocketAddr, local_ip: Option<IpAddr>) -> Outcome {
    let mut client = match local_ip {
        Some(ip) => RawClient::connect_from(ip, addr).await,
        None => RawClient::connect(addr).await,
    }
    .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    client
        .send(&wire::app_startup())
        .await
        .expect("send StartupMessage");
    client.outcome(Duration::from_secs(20)).await
}

/// What a raw client saw after its startup message.
#[derive(Debug)]
pub enum StartupResult {
    /// Reached ReadyForQuery; the stream is ready for queries.
    Ready(TcpStream),
    /// An ErrorResponse: SQLSTATE and message.
    Error { code: String, message: String },
    /// The connection ended without either.
    Closed,
}

impl StartupResult {
    /// The stream of a session that reached ReadyForQuery; panics otherwise.
    pub fn expect_ready(self) -> TcpStream {
        match self {
            StartupResult::Ready(s) => s,
            other => panic!("expected ReadyForQuery through sqlgate, got {other:?}"),
        }
    }
}

/// Connects to sqlgate at `addr`, sends the `app` StartupMessage and reads
/// until ReadyForQuery, an ErrorResponse, or EOF; bounded by `timeout`.
pub async fn raw_startup(addr: SocketAddr, timeout: Duration) -> StartupResult {
    tokio::time::timeout(timeout, async {
        let mut s = TcpStream::connect(addr).await.expect("connect to sqlgate");
        s.write_all(&wire::app_startup())
            .await
            .expect("send startup");
        loop {
            match read_message(&mut s).await {
                Ok(Some((b'Z', _))) => return StartupResult::Ready(s),
                Ok(Some((b'E', body))) => {
                    let fields = parse_error_fields(&body);
                    return StartupResult::Error {
                        code: fields.code,
                        message: fields.message,
                    };
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return StartupResult::Closed,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("startup through sqlgate did not finish within {timeout:?}"))
}

/// Sends a simple query and reads until ReadyForQuery; `Err` if the
/// connection ends first. Bounded by `timeout`.
///
/// # Errors
/// I/O errors, EOF before ReadyForQuery, or the timeout (`TimedOut`).
pub async fn simple_query(s: &mut TcpStream, sql: &str, timeout: Duration) -> io::Result<()> {
    tokio::time::timeout(timeout, async {
        s.write_all(&wire::query(sql)).await?;
        loop {
            match read_message(s).await? {
                Some((b'Z', _)) => return Ok(()),
                Some(_) => {}
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "query timed out"))?
}

/// Reads until EOF or error; returns how long that took, or `None` if the
/// stream is still open after `timeout`.
pub async fn time_to_end<S: AsyncRead + Unpin>(s: &mut S, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(timeout, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| started.elapsed())
}
