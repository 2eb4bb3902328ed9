//! The client's startup packets: SSLRequest, GSSENCRequest, CancelRequest and
//! StartupMessage, read under a hard size bound and parsed with checked
//! arithmetic.
//!
//! Formats: <https://www.postgresql.org/docs/current/protocol-message-formats.html>;
//! the request codes are in PostgreSQL's `src/include/libpq/pqcomm.h`.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::ProtocolError;

/// Smallest legal startup packet: length word plus code word.
pub const MIN_STARTUP_LEN: u32 = 8;
/// Largest startup packet accepted, as PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`
/// (src/include/libpq/pqcomm.h).
pub const MAX_STARTUP_LEN: u32 = 10_000;

/// `NEGOTIATE_SSL_CODE`: 1234 << 16 | 5679.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// `NEGOTIATE_GSS_CODE`: 1234 << 16 | 5680.
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// `CANCEL_REQUEST_CODE`: 1234 << 16 | 5678.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// First byte of a TLS handshake record: a client trying direct TLS.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Cancel keys are 4 bytes in protocol 3.0 and up to 256 bytes in 3.2
/// (src/include/libpq/pqcomm.h, `MAX_CANCEL_KEY_LENGTH`).
pub const CANCEL_KEY_LEN: std::ops::RangeInclusive<usize> = 4..=256;

/// A protocol version as sent in the StartupMessage (major in the high 16 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolVersion {
    pub major: u16,
    pub minor: u16,
}

impl ProtocolVersion {
    pub fn from_code(code: u32) -> Self {
        Self {
            major: (code >> 16) as u16,
            minor: (code & 0xffff) as u16,
        }
    }

    pub fn code(self) -> u32 {
        (u32::from(self.major) << 16) | u32::from(self.minor)
    }
}

/// One packet of the client's startup phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelRequest),
    Startup(StartupMessage),
}

/// A CancelRequest: the backend pid and secret key the client got in BackendKeyData.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelRequest {
    pub pid: u32,
    pub key: Vec<u8>,
}

impl CancelRequest {
    /// The wire form, length word included.
    pub fn encode(&self) -> Vec<u8> {
        let len = 12 + self.key.len();
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        out.extend_from_slice(&self.pid.to_be_bytes());
        out.extend_from_slice(&self.key);
        out
    }
}

/// Startup parameters in the order sent: (name, value) as raw bytes.
pub type Params = Vec<(Vec<u8>, Vec<u8>)>;

/// A StartupMessage: protocol version and the ordered parameters, kept as bytes
/// (PostgreSQL does not require them to be UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub version: ProtocolVersion,
    pub params: Params,
}

impl StartupMessage {
    /// The value of parameter `name`, if present.
    pub fn param(&self, name: &str) -> Option<&[u8]> {
        self.params
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// Appends `extra` to the `options` parameter (space-separated), adding the
    /// parameter when the client sent none.
    pub fn append_options(&mut self, extra: &str) {
        if extra.is_empty() {
            return;
        }
        match self.params.iter_mut().find(|(k, _)| k == b"options") {
            Some((_, value)) if !value.is_empty() => {
                value.push(b' ');
                value.extend_from_slice(extra.as_bytes());
            }
            Some((_, value)) => value.extend_from_slice(extra.as_bytes()),
            None => self
                .params
                .push((b"options".to_vec(), extra.as_bytes().to_vec())),
        }
    }

    /// The wire form, length word included.
    pub fn encode(&self) -> Vec<u8> {
        let body: usize = self.params.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        let len = 4 + 4 + body + 1;
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&self.version.code().to_be_bytes());
        for (k, v) in &self.params {
            out.extend_from_slice(k);
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out.push(0);
        out
    }
}

/// Parses one whole startup packet (`packet` includes its length word).
///
/// # Errors
/// On any length, code or layout the protocol does not allow.
pub fn parse_packet(packet: &[u8]) -> Result<FrontendPacket, ProtocolError> {
    let (len_bytes, rest) = packet
        .split_first_chunk::<4>()
        .ok_or(ProtocolError::Malformed("startup packet"))?;
    let len = u32::from_be_bytes(*len_bytes);
    check_len(len)?;
    if usize::try_from(len).ok() != Some(packet.len()) {
        return Err(ProtocolError::Malformed("startup packet"));
    }
    let (code_bytes, body) = rest
        .split_first_chunk::<4>()
        .ok_or(ProtocolError::Malformed("startup packet"))?;
    match u32::from_be_bytes(*code_bytes) {
        SSL_REQUEST_CODE if body.is_empty() => Ok(FrontendPacket::SslRequest),
        GSSENC_REQUEST_CODE if body.is_empty() => Ok(FrontendPacket::GssEncRequest),
        SSL_REQUEST_CODE => Err(ProtocolError::Malformed("SSLRequest")),
        GSSENC_REQUEST_CODE => Err(ProtocolError::Malformed("GSSENCRequest")),
        CANCEL_REQUEST_CODE => parse_cancel(body).map(FrontendPacket::Cancel),
        code => {
            let version = ProtocolVersion::from_code(code);
            if version.major != 3 {
                return Err(ProtocolError::UnsupportedVersion {
                    major: version.major,
                    minor: version.minor,
                });
            }
            let params = parse_params(body)?;
            // As PostgreSQL: the layout is checked first, then the user name.
            if !params.iter().any(|(k, v)| k == b"user" && !v.is_empty()) {
                return Err(ProtocolError::NoUser);
            }
            Ok(FrontendPacket::Startup(StartupMessage { version, params }))
        }
    }
}

fn check_len(len: u32) -> Result<(), ProtocolError> {
    if (MIN_STARTUP_LEN..=MAX_STARTUP_LEN).contains(&len) {
        Ok(())
    } else {
        Err(ProtocolError::BadLength(len))
    }
}

fn parse_cancel(body: &[u8]) -> Result<CancelRequest, ProtocolError> {
    let (pid, key) = body
        .split_first_chunk::<4>()
        .ok_or(ProtocolError::BadCancelKey(0))?;
    if !CANCEL_KEY_LEN.contains(&key.len()) {
        return Err(ProtocolError::BadCancelKey(key.len()));
    }
    Ok(CancelRequest {
        pid: u32::from_be_bytes(*pid),
        key: key.to_vec(),
    })
}

fn parse_params(body: &[u8]) -> Result<Params, ProtocolError> {
    const WHAT: &str = "StartupMessage";
    let mut params = Vec::new();
    let mut rest = body;
    loop {
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(ProtocolError::Malformed(WHAT))?;
        if end == 0 {
            // The terminating empty name must be the last byte.
            return if rest.len() == 1 {
                Ok(params)
            } else {
                Err(ProtocolError::Malformed(WHAT))
            };
        }
        let (key, tail) = rest.split_at(end);
        let (value, tail) =
            split_nul(tail.get(1..).unwrap_or_default()).ok_or(ProtocolError::Malformed(WHAT))?;
        params.push((key.to_vec(), value.to_vec()));
        rest = tail;
    }
}

/// Splits `bytes` at its first NUL: the part before it and the part after it.
fn split_nul(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = bytes.iter().position(|&b| b == 0)?;
    let (head, tail) = bytes.split_at(end);
    Some((head, tail.get(1..).unwrap_or_default()))
}

/// Reads startup packets from a client, buffering only what it must.
///
/// Reads are cancel-safe: bytes already received stay in the buffer.
pub struct StartupReader {
    buf: BytesMut,
    packets: usize,
}

impl Default for StartupReader {
    fn default() -> Self {
        Self::new()
    }
}

impl StartupReader {
    pub fn new() -> Self {
        Self {
            buf: BytesMut::with_capacity(512),
            packets: 0,
        }
    }

    /// Reads and parses the next packet.
    ///
    /// # Errors
    /// [`ProtocolError::Closed`] at end of stream, a direct-TLS error when the
    /// first byte opens a TLS record, otherwise the parse error.
    pub async fn next_packet<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> Result<FrontendPacket, ProtocolError> {
        loop {
            if let Some(packet) = self.try_packet()? {
                self.packets += 1;
                return Ok(packet);
            }
            let n = stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|_| ProtocolError::Closed)?;
            if n == 0 {
                return Err(if self.buf.is_empty() {
                    ProtocolError::Closed
                } else {
                    ProtocolError::Truncated
                });
            }
        }
    }

    fn try_packet(&mut self) -> Result<Option<FrontendPacket>, ProtocolError> {
        if self.packets == 0 && self.buf.first() == Some(&TLS_HANDSHAKE_RECORD) {
            return Err(ProtocolError::DirectTls);
        }
        let Some(len_bytes) = self.buf.first_chunk::<4>() else {
            self.buf.reserve(4);
            return Ok(None);
        };
        let len = u32::from_be_bytes(*len_bytes);
        check_len(len)?;
        let len = len as usize; // bounded by MAX_STARTUP_LEN
        if self.buf.len() < len {
            self.buf.reserve(len - self.buf.len());
            return Ok(None);
        }
        let packet = self.buf.split_to(len);
        parse_packet(&packet).map(Some)
    }

    /// Whether the client sent bytes beyond the packets read so far.
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Bytes received after the last packet (to be forwarded upstream).
    pub fn into_buffered(self) -> BytesMut {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        StartupMessage {
            version: ProtocolVersion { major: 3, minor: 0 },
            params: params
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        }
        .encode()
    }

    fn packet(code: u32, body: &[u8]) -> Vec<u8> {
        let mut out = ((8 + body.len()) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&code.to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn parses_each_kind_of_packet() {
        let cases: Vec<(Vec<u8>, FrontendPacket)> = vec![
            (packet(SSL_REQUEST_CODE, b""), FrontendPacket::SslRequest),
            (
                packet(GSSENC_REQUEST_CODE, b""),
                FrontendPacket::GssEncRequest,
            ),
            (
                packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7, 1, 2, 3, 4]),
                FrontendPacket::Cancel(CancelRequest {
                    pid: 7,
                    key: vec![1, 2, 3, 4],
                }),
            ),
            (
                packet(
                    CANCEL_REQUEST_CODE,
                    &[[0, 0, 0, 9].as_slice(), &[5; 32]].concat(),
                ),
                FrontendPacket::Cancel(CancelRequest {
                    pid: 9,
                    key: vec![5; 32],
                }),
            ),
            (
                startup(&[("user", "app"), ("database", "db")]),
                FrontendPacket::Startup(StartupMessage {
                    version: ProtocolVersion { major: 3, minor: 0 },
                    params: vec![
                        (b"user".to_vec(), b"app".to_vec()),
                        (b"database".to_vec(), b"db".to_vec()),
                    ],
                }),
            ),
            (
                packet(0x0003_0002, b"user\0u\0_pq_.x\0y\0\0"),
                FrontendPacket::Startup(StartupMessage {
                    version: ProtocolVersion { major: 3, minor: 2 },
                    params: vec![
                        (b"user".to_vec(), b"u".to_vec()),
                        (b"_pq_.x".to_vec(), b"y".to_vec()),
                    ],
                }),
            ),
        ];
        assert!(!cases.is_empty());
        for (bytes, want) in cases {
            assert_eq!(parse_packet(&bytes), Ok(want));
        }
    }

    #[test]
    fn rejects_malformed_packets() {
        let mut too_long = 10_001u32.to_be_bytes().to_vec();
        too_long.resize(10_001, 0);
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0, 0, 0, 0],
            vec![0, 0, 0, 7, 0, 0, 0],
            too_long,
            packet(SSL_REQUEST_CODE, b"x"),
            packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 1, 2]),
            packet(CANCEL_REQUEST_CODE, &[0; 4 + 257]),
            packet(0x0002_0000, b"user\0u\0\0"),
            packet(0x0003_0000, b"user\0u\0"),
            packet(0x0003_0000, b"user\0u\0\0junk"),
            packet(0x0003_0000, b"user\0"),
            packet(0x0003_0000, b""),
        ];
        assert!(!cases.is_empty());
        for bytes in cases {
            assert!(parse_packet(&bytes).is_err(), "accepted {bytes:?}");
        }
    }

    #[test]
    fn appends_options_to_what_the_client_sent() {
        let mut with = StartupMessage {
            version: ProtocolVersion { major: 3, minor: 0 },
            params: vec![(b"options".to_vec(), b"-c a=b".to_vec())],
        };
        with.append_options("--cluster=x");
        assert_eq!(with.param("options"), Some(&b"-c a=b --cluster=x"[..]));
        let mut without = StartupMessage {
            version: ProtocolVersion { major: 3, minor: 0 },
            params: vec![(b"user".to_vec(), b"u".to_vec())],
        };
        without.append_options("--cluster=x");
        assert_eq!(without.param("options"), Some(&b"--cluster=x"[..]));
    }

    #[tokio::test]
    async fn reader_handles_packets_split_and_joined() {
        let mut bytes = packet(SSL_REQUEST_CODE, b"");
        bytes.extend(startup(&[("user", "app")]));
        bytes.extend_from_slice(b"Q");
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for b in bytes {
                client.write_all(&[b]).await.expect("write");
            }
            client
        });
        let mut reader = StartupReader::new();
        assert_eq!(
            reader.next_packet(&mut server).await,
            Ok(FrontendPacket::SslRequest)
        );
        assert!(matches!(
            reader.next_packet(&mut server).await,
            Ok(FrontendPacket::Startup(_))
        ));
        drop(writer.await.expect("writer"));
        let _ = reader.next_packet(&mut server).await;
    }

    #[tokio::test]
    async fn reader_spots_a_tls_client_hello() {
        let (mut client, mut server) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        client
            .write_all(&[0x16, 3, 1, 0, 200, 1])
            .await
            .expect("write");
        let mut reader = StartupReader::new();
        assert_eq!(
            reader.next_packet(&mut server).await,
            Err(ProtocolError::DirectTls)
        );
    }
}

#[cfg(test)]
mod split_properties {
    //! Parsing is the same however the client's bytes are split into reads.

    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use proptest::prelude::*;
    use tokio::io::ReadBuf;

    use super::*;

    /// Hands out `data` in reads of the given sizes; never pending.
    struct Chunked {
        data: Vec<u8>,
        sizes: Vec<usize>,
        at: usize,
        read: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let size = self.sizes.get(self.read).copied().unwrap_or(usize::MAX);
            self.read += 1;
            let end = self
                .data
                .len()
                .min(self.at.saturating_add(size.max(1)))
                .min(self.at + buf.remaining());
            let chunk = self.data[self.at..end].to_vec();
            buf.put_slice(&chunk);
            self.at = end;
            Poll::Ready(Ok(()))
        }
    }

    fn read_all(data: &[u8], sizes: Vec<usize>) -> Vec<Result<FrontendPacket, ProtocolError>> {
        let mut stream = Chunked {
            data: data.to_vec(),
            sizes,
            at: 0,
            read: 0,
        };
        let mut reader = StartupReader::new();
        let mut out = Vec::new();
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..6 {
            let mut next = std::pin::pin!(reader.next_packet(&mut stream));
            let Poll::Ready(result) = next.as_mut().poll(&mut cx) else {
                panic!("an always-ready stream left the reader pending");
            };
            let stop = result.is_err();
            out.push(result);
            if stop {
                break;
            }
        }
        out
    }

    fn packet_strategy() -> impl Strategy<Value = Vec<u8>> {
        let param = (
            proptest::collection::vec(1u8..=255, 1..12),
            proptest::collection::vec(1u8..=255, 0..24),
        );
        prop_oneof![
            Just(
                8u32.to_be_bytes()
                    .iter()
                    .chain(&SSL_REQUEST_CODE.to_be_bytes())
                    .copied()
                    .collect()
            ),
            Just(
                8u32.to_be_bytes()
                    .iter()
                    .chain(&GSSENC_REQUEST_CODE.to_be_bytes())
                    .copied()
                    .collect()
            ),
            (
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 4..=256)
            )
                .prop_map(|(pid, key)| { CancelRequest { pid, key }.encode() }),
            (
                prop_oneof![Just(0u16), Just(2), Just(9999)],
                proptest::collection::vec(param, 0..5)
            )
                .prop_map(|(minor, params)| {
                    StartupMessage {
                        version: ProtocolVersion { major: 3, minor },
                        params,
                    }
                    .encode()
                }),
            proptest::collection::vec(any::<u8>(), 0..40),
        ]
    }

    proptest! {
        #[test]
        fn reads_the_same_packets_however_the_bytes_are_split(
            packets in proptest::collection::vec(packet_strategy(), 1..4),
            sizes in proptest::collection::vec(1usize..64, 0..64),
        ) {
            let data: Vec<u8> = packets.concat();
            let whole = read_all(&data, Vec::new());
            let split = read_all(&data, sizes);
            prop_assert_eq!(whole, split);
        }

        #[test]
        fn accepted_packets_encode_back_to_their_bytes(packet in packet_strategy()) {
            match parse_packet(&packet) {
                Ok(FrontendPacket::Startup(s)) => prop_assert_eq!(s.encode(), packet),
                Ok(FrontendPacket::Cancel(c)) => prop_assert_eq!(c.encode(), packet),
                Ok(_) => prop_assert_eq!(packet.len(), 8),
                Err(_) => {}
            }
        }
    }
}
