//! Client startup packets (SSLRequest, GSSENCRequest, CancelRequest,
//! StartupMessage 3.0/3.2/3.x): `parse_packet` on the whole input, and
//! `StartupReader` on the same bytes delivered in reads of fuzzer-chosen sizes.
//!
//! Oracles: no panic; the reader yields exactly the packets `parse_packet`
//! yields for the same framing; an accepted StartupMessage or CancelRequest
//! encodes back to the bytes it was parsed from.

#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use sqlgate::pgwire::frontend::{FrontendPacket, StartupReader, parse_packet};
use tokio::io::{AsyncRead, ReadBuf};

/// An in-memory stream that hands out `data` in reads of the given sizes; it
/// is never pending, so futures over it finish in one poll.
struct Chunked<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let size = match self.sizes.split_first() {
            Some((&s, rest)) => {
                self.sizes = rest;
                usize::from(s).max(1)
            }
            None => usize::MAX,
        };
        let n = size.min(self.data.len()).min(buf.remaining());
        let (now, later) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = later;
        Poll::Ready(Ok(()))
    }
}

fn check_round_trip(bytes: &[u8], packet: &FrontendPacket) {
    match packet {
        FrontendPacket::Startup(s) => assert_eq!(s.encode(), bytes, "StartupMessage round trip"),
        FrontendPacket::Cancel(c) => assert_eq!(c.encode(), bytes, "CancelRequest round trip"),
        FrontendPacket::SslRequest | FrontendPacket::GssEncRequest => assert_eq!(bytes.len(), 8),
    }
}

fuzz_target!(|input: &[u8]| {
    // First byte: how many read sizes follow; then the sizes; then the stream.
    let (count, rest) = input
        .split_first()
        .map_or((0, input), |(c, r)| (usize::from(*c % 16), r));
    let (sizes, data) = rest.split_at(count.min(rest.len()));

    if let Ok(packet) = parse_packet(data) {
        check_round_trip(data, &packet);
    }

    let mut stream = Chunked { data, sizes };
    let mut reader = StartupReader::new();
    let mut offset = 0usize;
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..8 {
        let mut next = std::pin::pin!(reader.next_packet(&mut stream));
        let Poll::Ready(result) = next.as_mut().poll(&mut cx) else {
            panic!("an always-ready stream left the reader pending");
        };
        let Ok(packet) = result else { break };
        // Framed by its length word, which the reader checked.
        let len = data
            .get(offset..offset + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .expect("a packet was read, so its length word is there");
        let whole = &data[offset..offset + len];
        assert_eq!(
            parse_packet(whole).as_ref(),
            Ok(&packet),
            "reader and parse_packet agree"
        );
        check_round_trip(whole, &packet);
        offset += len;
    }
});
