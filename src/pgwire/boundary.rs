//! Message boundaries of a relayed session, as a sans-I/O observer: the relay
//! shows it every chunk it forwards and it scans only message headers (tag
//! and length), never copying or parsing a body, except the one status byte
//! of ReadyForQuery.
//!
//! - [`ServerStream`] (server → client): whether the stream is between
//!   messages, the status of the last ReadyForQuery, COPY states, how many
//!   ReadyForQuery went by.
//! - [`ClientStream`] (client → server): messages that ask for a
//!   ReadyForQuery (Query, Sync, FunctionCall), extended-protocol messages
//!   not yet followed by a Sync, and where a Terminate starts (so a pooled
//!   session can keep it from the server).
//! - [`Boundaries`]: both, and the one question session pooling asks
//!   ([`Boundaries::is_clean`]): may this server session serve another client?
//!
//! Transaction pooling can grow from the same counters: a server session is
//! free between transactions when [`Boundaries::is_clean`] holds after a
//! ReadyForQuery `I`.
//!
//! Message formats: <https://www.postgresql.org/docs/current/protocol-message-formats.html>.

use super::startup::TransactionStatus;

/// Message tags this module cares about.
mod tag {
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_FAIL: u8 = b'f';
    pub const QUERY: u8 = b'Q';
    pub const SYNC: u8 = b'S';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const TERMINATE: u8 = b'X';
}

/// Where a header scan is: inside a 5-byte header, or skipping a body.
#[derive(Debug, Clone, Default)]
struct Framer {
    header: [u8; 5],
    /// Header bytes seen of the current message (0 when between messages or
    /// in a body).
    have: usize,
    /// Body bytes still to skip.
    left: usize,
    /// A length below 4: the stream is not the protocol any more.
    broken: bool,
}

/// What [`Framer::step`] found.
enum Step {
    /// `n` bytes consumed, nothing to report.
    Consumed(usize),
    /// `n` bytes consumed, completing the header of a message with this tag
    /// and body length.
    Header(usize, u8, usize),
}

impl Framer {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0 && !self.broken
    }

    /// Consumes a prefix of `data` (not empty) up to the next event.
    fn step(&mut self, data: &[u8]) -> Step {
        if self.left > 0 {
            let n = self.left.min(data.len());
            self.left -= n;
            return Step::Consumed(n);
        }
        let n = (5 - self.have).min(data.len());
        self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
        self.have += n;
        if self.have < 5 {
            return Step::Consumed(n);
        }
        self.have = 0;
        let [tag, a, b, c, d] = self.header;
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        if len < 4 {
            self.broken = true;
            return Step::Consumed(data.len());
        }
        self.left = len - 4;
        Step::Header(n, tag, len - 4)
    }
}

/// COPY sub-protocol state, as the server announced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Copy {
    #[default]
    None,
    /// CopyInResponse: the client sends CopyData until CopyDone/CopyFail.
    In,
    /// CopyOutResponse: the server sends CopyData until CopyDone.
    Out,
    /// CopyBothResponse (replication).
    Both,
}

/// The server → client stream.
#[derive(Debug, Clone)]
pub struct ServerStream {
    framer: Framer,
    /// The next body byte is a ReadyForQuery status.
    want_status: bool,
    status: Option<TransactionStatus>,
    copy: Copy,
    readies: u64,
}

impl ServerStream {
    /// A stream that starts right after a ReadyForQuery with `status`.
    pub fn after_ready(status: TransactionStatus) -> Self {
        ServerStream {
            framer: Framer::default(),
            want_status: false,
            status: Some(status),
            copy: Copy::None,
            readies: 0,
        }
    }

    /// Scans bytes the client was sent.
    pub fn observe(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.framer.broken {
            if self.want_status && self.framer.left > 0 {
                self.want_status = false;
                self.status = TransactionStatus::from_byte(data[0]).ok();
                if self.status.is_none() {
                    self.framer.broken = true;
                }
                self.readies += 1;
                self.copy = Copy::None;
            }
            match self.framer.step(data) {
                Step::Consumed(n) => data = &data[n..],
                Step::Header(n, tag, len) => {
                    data = &data[n..];
                    match tag {
                        tag::READY_FOR_QUERY if len == 1 => self.want_status = true,
                        tag::READY_FOR_QUERY => self.framer.broken = true,
                        tag::COPY_IN_RESPONSE => self.copy = Copy::In,
                        tag::COPY_OUT_RESPONSE => self.copy = Copy::Out,
                        tag::COPY_BOTH_RESPONSE => self.copy = Copy::Both,
                        tag::COPY_DONE if self.copy == Copy::Out => self.copy = Copy::None,
                        _ => {}
                    }
                }
            }
        }
    }

    /// Between two messages.
    pub fn at_boundary(&self) -> bool {
        self.framer.at_boundary() && !self.want_status
    }

    /// The status of the last ReadyForQuery (`None` if it was not a valid one).
    pub fn status(&self) -> Option<TransactionStatus> {
        self.status
    }

    pub fn copy(&self) -> Copy {
        self.copy
    }

    /// ReadyForQuery messages seen.
    pub fn readies(&self) -> u64 {
        self.readies
    }
}

/// The client → server stream.
#[derive(Debug, Clone, Default)]
pub struct ClientStream {
    framer: Framer,
    /// Query, Sync and FunctionCall messages: each gets one ReadyForQuery.
    syncs: u64,
    /// Extended-protocol messages since the last Sync (or Query).
    unsynced: u64,
    terminated: bool,
}

impl ClientStream {
    /// Scans bytes from the client and returns how many of them to forward:
    /// all of them, or those before a Terminate (which, and everything after
    /// it, the caller keeps from the server).
    pub fn observe(&mut self, data: &[u8]) -> usize {
        if self.terminated {
            return 0;
        }
        let mut at = 0;
        while at < data.len() && !self.framer.broken {
            if self.framer.at_boundary() && data[at] == tag::TERMINATE {
                self.terminated = true;
                return at;
            }
            match self.framer.step(&data[at..]) {
                Step::Consumed(n) => at += n,
                Step::Header(n, tag, _) => {
                    at += n;
                    match tag {
                        tag::QUERY | tag::SYNC | tag::FUNCTION_CALL => {
                            self.syncs += 1;
                            self.unsynced = 0;
                        }
                        tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL => {}
                        _ => self.unsynced += 1,
                    }
                }
            }
        }
        data.len()
    }

    pub fn at_boundary(&self) -> bool {
        self.framer.at_boundary()
    }

    /// The client sent Terminate.
    pub fn terminated(&self) -> bool {
        self.terminated
    }

    /// Messages that each ask for a ReadyForQuery.
    pub fn syncs(&self) -> u64 {
        self.syncs
    }
}

/// Both directions of one session.
#[derive(Debug, Clone)]
pub struct Boundaries {
    pub server: ServerStream,
    pub client: ClientStream,
}

impl Boundaries {
    /// A session at ReadyForQuery `I`, as a pooled session starts.
    pub fn new() -> Self {
        Boundaries {
            server: ServerStream::after_ready(TransactionStatus::Idle),
            client: ClientStream::default(),
        }
    }

    /// Whether the server session may serve another client: both streams
    /// between messages, every Query/Sync answered with a ReadyForQuery, the
    /// last one `I`, no COPY, no extended-protocol message waiting for a Sync.
    pub fn is_clean(&self) -> bool {
        self.dirty().is_none()
    }

    /// Why the server session may not serve another client, or `None` when
    /// it may (see [`Boundaries::is_clean`]).
    pub fn dirty(&self) -> Option<Dirty> {
        if self.server.framer.broken || self.client.framer.broken {
            return Some(Dirty::Broken);
        }
        if self.server.copy() != Copy::None {
            return Some(Dirty::Copy);
        }
        if !self.server.at_boundary()
            || !self.client.at_boundary()
            || self.client.unsynced != 0
            || self.client.syncs() != self.server.readies()
        {
            return Some(Dirty::InFlight);
        }
        match self.server.status() {
            Some(TransactionStatus::Idle) => None,
            _ => Some(Dirty::Transaction),
        }
    }
}

/// Why a session is not clean: the log line's reason when sqlgate closes a
/// pooled server session instead of reusing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dirty {
    /// The last ReadyForQuery said `T` or `E`.
    Transaction,
    /// COPY in either direction was under way.
    Copy,
    /// A query, a result, a message or an unsynced extended-protocol batch
    /// was still on its way.
    InFlight,
    /// A stream stopped being the protocol.
    Broken,
}

impl Dirty {
    pub fn as_str(self) -> &'static str {
        match self {
            Dirty::Transaction => "its client left inside a transaction",
            Dirty::Copy => "its client left mid-COPY",
            Dirty::InFlight => "its client left mid-query or with unread results",
            Dirty::Broken => "the session stopped speaking the protocol",
        }
    }
}

impl Default for Boundaries {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }

    /// Feeds client and server bytes, each split at `split`, and says whether
    /// the session is clean afterwards.
    fn clean_after(client: &[u8], server: &[u8], split: usize) -> bool {
        let mut b = Boundaries::new();
        let (c1, c2) = client.split_at(split.min(client.len()));
        let (s1, s2) = server.split_at(split.min(server.len()));
        let forwarded = b.client.observe(c1) + b.client.observe(c2);
        assert!(forwarded <= client.len());
        b.server.observe(s1);
        b.server.observe(s2);
        b.is_clean()
    }

    fn query(sql: &str) -> Vec<u8> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        msg(b'Q', &body)
    }

    #[test]
    fn decides_cleanliness_at_every_split() {
        let ready = |s: u8| msg(b'Z', &[s]);
        let row = msg(b'D', &[0, 1, 0, 0, 0, 1, b'1']);
        let done = msg(b'C', b"SELECT 1\0");
        let cases: Vec<(&str, Vec<u8>, Vec<u8>, bool)> = vec![
            ("nothing happened", vec![], vec![], true),
            (
                "a query answered",
                query("select 1"),
                cat(&[msg(b'T', &[0, 0]), row.clone(), done.clone(), ready(b'I')]),
                true,
            ),
            (
                "a query not answered",
                query("select pg_sleep(9)"),
                vec![],
                false,
            ),
            (
                "answer half sent",
                query("select 1"),
                cat(&[msg(b'T', &[0, 0]), row[..4].to_vec()]),
                false,
            ),
            (
                "left in a transaction",
                query("begin"),
                cat(&[msg(b'C', b"BEGIN\0"), ready(b'T')]),
                false,
            ),
            (
                "left in a failed transaction",
                query("begin; x"),
                cat(&[msg(b'E', b"SERROR\0\0"), ready(b'E')]),
                false,
            ),
            (
                "mid COPY FROM STDIN",
                cat(&[query("copy t from stdin"), msg(b'd', b"1\n")]),
                msg(b'G', &[0, 0, 0]),
                false,
            ),
            (
                "COPY FROM STDIN finished",
                cat(&[
                    query("copy t from stdin"),
                    msg(b'd', b"1\n"),
                    msg(b'c', b""),
                ]),
                cat(&[msg(b'G', &[0, 0, 0]), msg(b'C', b"COPY 1\0"), ready(b'I')]),
                true,
            ),
            (
                "mid COPY TO STDOUT",
                query("copy t to stdout"),
                cat(&[msg(b'H', &[0, 0, 0]), msg(b'd', b"1\n")]),
                false,
            ),
            (
                "extended protocol without Sync",
                cat(&[
                    msg(b'P', b"\0select 1\0\0\0"),
                    msg(b'B', b"\0\0\0\0\0\0\0\0"),
                ]),
                vec![],
                false,
            ),
            (
                "extended protocol synced and answered",
                cat(&[msg(b'P', b"\0select 1\0\0\0"), msg(b'S', b"")]),
                cat(&[msg(b'1', b""), ready(b'I')]),
                true,
            ),
            (
                "terminate after an answered query",
                cat(&[query("select 1"), msg(b'X', b"")]),
                cat(&[done.clone(), ready(b'I')]),
                true,
            ),
            (
                "notification and parameter status between queries",
                vec![],
                cat(&[msg(b'A', b"\0\0\0\x01c\0\0"), msg(b'S', b"TimeZone\0UTC\0")]),
                true,
            ),
        ];
        assert!(!cases.is_empty());
        let dirty_as = |client: &[u8], server: &[u8]| {
            let mut b = Boundaries::new();
            b.client.observe(client);
            b.server.observe(server);
            b.dirty()
        };
        assert_eq!(
            dirty_as(&query("begin"), &cat(&[msg(b'C', b"BEGIN\0"), ready(b'T')])),
            Some(Dirty::Transaction)
        );
        assert_eq!(
            dirty_as(&query("copy t to stdout"), &msg(b'H', &[0, 0, 0])),
            Some(Dirty::Copy)
        );
        assert_eq!(
            dirty_as(&query("select pg_sleep(9)"), &[]),
            Some(Dirty::InFlight)
        );
        for (what, client, server, clean) in &cases {
            for split in 0..=client.len().max(server.len()) {
                assert_eq!(
                    clean_after(client, server, split),
                    *clean,
                    "{what}, split at {split}"
                );
            }
        }
    }

    #[test]
    fn withholds_terminate_and_what_follows() {
        let wire = cat(&[query("select 1"), msg(b'X', b""), b"junk".to_vec()]);
        let at = query("select 1").len();
        for split in 0..=wire.len() {
            let mut c = ClientStream::default();
            let (a, b) = wire.split_at(split);
            let first = c.observe(a);
            let second = c.observe(b);
            if split <= at {
                assert_eq!(first, split, "split {split}");
                assert_eq!(second, at - split, "split {split}");
            } else {
                assert_eq!(first, at, "split {split}");
                assert_eq!(second, 0, "split {split}");
            }
            assert!(c.terminated());
        }
    }

    #[test]
    fn a_length_below_four_breaks_the_stream_for_good() {
        let mut s = ServerStream::after_ready(TransactionStatus::Idle);
        s.observe(&[b'Z', 0, 0, 0, 2, b'I']);
        assert!(!s.at_boundary());
        let mut b = Boundaries::new();
        b.server = s;
        assert!(!b.is_clean());
    }

    proptest! {
        #[test]
        fn never_panics_on_any_bytes(client in proptest::collection::vec(any::<u8>(), 0..512),
                                     server in proptest::collection::vec(any::<u8>(), 0..512),
                                     split in 0usize..512) {
            let _ = clean_after(&client, &server, split);
        }
    }
}
