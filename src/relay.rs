//! The byte relay after the startup phase: both directions at once, with byte
//! counts, ending when either side closes.
//!
//! Built for many mostly idle sessions on few cores:
//! - **No buffer is held while a session is idle.** Client bytes are read into a
//!   buffer on the stack and written to the upstream at once; only the part a
//!   full upstream cannot take yet is copied to the heap, and that copy is freed
//!   as soon as it is written. Upstream bytes are written to the client straight
//!   from the TLS layer's plaintext buffer ([`AsyncBufRead`]), without a copy.
//! - **Few syscalls per message.** One read and one write per message each way;
//!   the writer is flushed only when its reader has nothing more to give, so a
//!   burst of messages is not flushed message by message.
//! - **Prompt close.** When one side closes, the other side's write half is shut
//!   down (TLS close_notify, TCP FIN) and the relay waits at most
//!   [`CLOSE_GRACE`] for the other direction to finish.
//! - **Stop at rest.** [`relay_until_rest`] also ends, once a stop signal has
//!   come (sqlgate's drain), as soon as its [`Observer`] says the session is at
//!   rest and both directions are idle and flushed: the caller may then close
//!   both sides cleanly.

use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

/// Largest client read, on the stack: one TLS record of plaintext (16 KiB).
pub const READ_SIZE: usize = 16 * 1024;

/// How long the relay waits, after one side closed, for the other direction to
/// deliver what is in flight and close too.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// One end of a relayed session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
}

/// An I/O error of the relay, with the side whose socket failed.
#[derive(Debug, thiserror::Error)]
#[error("{} connection failed: {source}", side.as_str())]
pub struct RelayError {
    pub side: Side,
    #[source]
    pub source: io::Error,
}

/// Tags an I/O error with the side whose socket it came from.
fn on(side: Side) -> impl FnOnce(io::Error) -> RelayError {
    move |source| RelayError { side, source }
}

/// Sees what the relay forwards (session pooling's boundary tracking). The
/// plain relay uses [`NoObserver`], which compiles to nothing.
pub trait Observer {
    /// Client bytes about to go to the upstream: returns how many of them to
    /// forward. Fewer than `data.len()` ends the client's direction there
    /// (the rest is dropped), as if the client had closed.
    fn client_bytes(&mut self, data: &[u8]) -> usize {
        data.len()
    }
    /// Upstream bytes the client took.
    fn upstream_bytes(&mut self, _data: &[u8]) {}
    /// Whether the session is between messages with nothing asked and not
    /// answered: [`relay_until_rest`] may end there once stopped.
    fn at_rest(&self) -> bool {
        false
    }
    /// Whether the upstream's write half is shut down when the client's
    /// direction ends. `false` keeps the server session open (pooling); the
    /// relay then ends as soon as the client's direction does.
    const CLOSES_UPSTREAM: bool = true;
}

/// The plain relay's observer: forwards everything, closes the upstream.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl Observer for NoObserver {}

impl<O: Observer + ?Sized> Observer for &mut O {
    fn client_bytes(&mut self, data: &[u8]) -> usize {
        (**self).client_bytes(data)
    }
    fn upstream_bytes(&mut self, data: &[u8]) {
        (**self).upstream_bytes(data);
    }
    fn at_rest(&self) -> bool {
        (**self).at_rest()
    }
    const CLOSES_UPSTREAM: bool = O::CLOSES_UPSTREAM;
}

/// How [`relay_until_rest`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// This side closed first (as [`relay_counted`] returns).
    Closed(Side),
    /// Stopped at rest: both sides are open, idle and flushed.
    AtRest,
}

/// Bytes moved each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    pub to_upstream: u64,
    pub to_client: u64,
}

/// Relays until either side closes; the other side's write half is then shut
/// down and the relay waits at most [`CLOSE_GRACE`] for the other direction to
/// end as well.
///
/// # Errors
/// The first I/O error on either side (reset, broken pipe, TLS error).
pub async fn relay<C, U>(client: &mut C, upstream: &mut U) -> io::Result<Transferred>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncBufRead + AsyncWrite + Unpin + ?Sized,
{
    let mut moved = Transferred::default();
    relay_counted(client, upstream, &mut moved)
        .await
        .map_err(|e| e.source)?;
    Ok(moved)
}

/// [`relay`], keeping the byte counts in `moved` as it goes, so that they are
/// known even when the relay fails or its future is dropped (a session cut by
/// sqlgate). Returns the side that closed first.
///
/// # Errors
/// The first I/O error on either side (reset, broken pipe, TLS error, a
/// TCP_USER_TIMEOUT), with the side whose socket failed.
pub async fn relay_counted<C, U>(
    client: &mut C,
    upstream: &mut U,
    moved: &mut Transferred,
) -> Result<Side, RelayError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncBufRead + AsyncWrite + Unpin + ?Sized,
{
    relay_observed(client, upstream, moved, &mut NoObserver).await
}

/// [`relay_counted`], showing every forwarded chunk to `observer` (see
/// [`Observer`]). With `O::CLOSES_UPSTREAM == false` the relay ends when the
/// client's direction does, leaving the upstream open and unshut. Returns
/// the side that closed first.
///
/// # Errors
/// The first I/O error on either side, with the side whose socket failed.
pub async fn relay_observed<C, U, O>(
    client: &mut C,
    upstream: &mut U,
    moved: &mut Transferred,
    observer: &mut O,
) -> Result<Side, RelayError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncBufRead + AsyncWrite + Unpin + ?Sized,
    O: Observer,
{
    let never = std::pin::pin!(std::future::pending::<()>());
    match relay_until_rest(client, upstream, moved, observer, never).await? {
        Ended::Closed(side) => Ok(side),
        Ended::AtRest => unreachable!("a relay that is never stopped never stops at rest"),
    }
}

/// [`relay_observed`], which also ends once `stop` has completed and the
/// session is at rest ([`Observer::at_rest`], both directions waiting for
/// their reader and flushed): then it returns [`Ended::AtRest`] with both
/// sides open, and the caller closes them. Until `stop` completes it is the
/// plain relay; `stop` is polled alongside where the caller pinned it.
///
/// # Errors
/// The first I/O error on either side, with the side whose socket failed.
pub async fn relay_until_rest<C, U, O, F>(
    client: &mut C,
    upstream: &mut U,
    moved: &mut Transferred,
    observer: &mut O,
    mut stop: Pin<&mut F>,
) -> Result<Ended, RelayError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncBufRead + AsyncWrite + Unpin + ?Sized,
    O: Observer,
    F: Future<Output = ()>,
{
    let mut to_upstream = FromClient::default();
    let mut to_client = FromUpstream::default();
    let mut stopped = false;
    // Polls both directions once, records the counts, and says which have
    // ended (or `None`: stopped at rest).
    let mut step = |cx: &mut Context<'_>| -> Result<Option<(bool, bool)>, RelayError> {
        let up = to_upstream.poll(cx, &mut *client, &mut *upstream, &mut *observer);
        let down = to_client.poll(cx, &mut *upstream, &mut *client, &mut *observer);
        *moved = Transferred {
            to_upstream: to_upstream.state.moved,
            to_client: to_client.state.moved,
        };
        let ended = (up?.is_ready(), down?.is_ready());
        if !stopped {
            stopped = stop.as_mut().poll(cx).is_ready();
        }
        if stopped
            && ended == (false, false)
            && to_upstream.state.resting()
            && to_upstream.pending.is_empty()
            && to_client.state.resting()
            && observer.at_rest()
        {
            return Ok(None);
        }
        Ok(Some(ended))
    };

    // Until one direction has ended (EOF read and the peer's write half shut).
    let (client_done, _) = match poll_fn(|cx| match step(cx) {
        Ok(Some((false, false))) => Poll::Pending,
        Ok(None) => Poll::Ready(Ok(None)),
        Ok(Some(ended)) => Poll::Ready(Ok(Some(ended))),
        Err(e) => Poll::Ready(Err(e)),
    })
    .await?
    {
        Some(ended) => ended,
        None => return Ok(Ended::AtRest),
    };
    let first = if client_done {
        Side::Client
    } else {
        Side::Upstream
    };
    if client_done && !O::CLOSES_UPSTREAM {
        // The server session stays open: nothing to wait for.
        return Ok(Ended::Closed(first));
    }

    // Then, briefly, for the other one.
    let rest = poll_fn(|cx| match step(cx) {
        Ok(Some((true, true))) => Poll::Ready(Ok(())),
        Ok(_) => Poll::Pending,
        Err(e) => Poll::Ready(Err(e)),
    });
    if let Ok(ended) = tokio::time::timeout(CLOSE_GRACE, rest).await {
        ended?;
    }
    Ok(Ended::Closed(first))
}

/// What both directions track.
#[derive(Debug, Default)]
struct State {
    /// Bytes the writer accepted.
    moved: u64,
    /// The writer accepted bytes since it was last flushed.
    needs_flush: bool,
    /// The reader reached EOF; what is left is to shut the writer down.
    read_eof: bool,
    /// The writer is shut down: this direction is over.
    done: bool,
    /// The last poll found the reader with nothing to give.
    waiting: bool,
}

impl State {
    /// Waiting for its reader, with everything written flushed.
    fn resting(&self) -> bool {
        self.waiting && !self.needs_flush && !self.read_eof
    }

    /// Writes as much of `data` as the writer takes now; `Ready(n)` with the
    /// count, or `Pending` when it took nothing.
    fn poll_write<W>(
        &mut self,
        cx: &mut Context<'_>,
        writer: &mut W,
        data: &[u8],
    ) -> Poll<io::Result<usize>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        match Pin::new(writer).poll_write(cx, data) {
            Poll::Ready(Ok(0)) => Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                self.moved += n as u64;
                self.needs_flush = true;
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    /// The reader has nothing now: flush what was written, so it does not sit
    /// in a buffer (the TLS layer's) while both peers wait.
    fn poll_idle<W>(&mut self, cx: &mut Context<'_>, writer: &mut W) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.needs_flush {
            match Pin::new(writer).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.needs_flush = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }

    /// After EOF: shut the writer down (this flushes it first).
    fn poll_finish<W>(&mut self, cx: &mut Context<'_>, writer: &mut W) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        match Pin::new(writer).poll_shutdown(cx) {
            Poll::Ready(Ok(())) => {
                self.done = true;
                self.needs_flush = false;
                Poll::Ready(Ok(()))
            }
            // The peer already went away: nothing left to tell it.
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::NotConnected => {
                self.done = true;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

/// Client → upstream: read into a stack buffer, write at once; keep on the
/// heap only what the upstream could not take yet.
#[derive(Debug, Default)]
struct FromClient {
    state: State,
    /// Read but not yet written; empty (and unallocated) almost always.
    pending: Vec<u8>,
    /// How much of `pending` is written.
    written: usize,
}

impl FromClient {
    fn poll<R, W, O>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        observer: &mut O,
    ) -> Poll<Result<(), RelayError>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
        O: Observer,
    {
        if self.state.done {
            return Poll::Ready(Ok(()));
        }
        let mut stack = [MaybeUninit::<u8>::uninit(); READ_SIZE];
        loop {
            while self.written < self.pending.len() {
                let n = match self
                    .state
                    .poll_write(cx, writer, &self.pending[self.written..])
                {
                    Poll::Ready(r) => r.map_err(on(Side::Upstream))?,
                    Poll::Pending => return Poll::Pending,
                };
                self.written += n;
            }
            if !self.pending.is_empty() {
                // Free it: an idle session holds no buffer.
                self.pending = Vec::new();
                self.written = 0;
            }
            if self.state.read_eof {
                if !O::CLOSES_UPSTREAM {
                    // Flush, but keep the upstream open for the next client.
                    if self.state.needs_flush {
                        std::task::ready!(Pin::new(&mut *writer).poll_flush(cx))
                            .map_err(on(Side::Upstream))?;
                        self.state.needs_flush = false;
                    }
                    self.state.done = true;
                    return Poll::Ready(Ok(()));
                }
                return self
                    .state
                    .poll_finish(cx, writer)
                    .map_err(on(Side::Upstream));
            }

            let mut buf = ReadBuf::uninit(&mut stack);
            match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(on(Side::Client)(e))),
                Poll::Pending => {
                    self.state.waiting = true;
                    return self.state.poll_idle(cx, writer).map_err(on(Side::Upstream));
                }
            }
            self.state.waiting = false;
            let mut data = buf.filled();
            if data.is_empty() {
                self.state.read_eof = true;
                continue;
            }
            let keep = observer.client_bytes(data);
            if keep < data.len() {
                data = &data[..keep];
                self.state.read_eof = true;
            }
            let mut written = 0;
            while written < data.len() {
                match self.state.poll_write(cx, writer, &data[written..]) {
                    Poll::Ready(r) => written += r.map_err(on(Side::Upstream))?,
                    Poll::Pending => {
                        self.pending = data[written..].to_vec();
                        self.written = 0;
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

/// Upstream → client: write straight from the TLS layer's plaintext buffer;
/// bytes not yet written simply stay there.
#[derive(Debug, Default)]
struct FromUpstream {
    state: State,
}

impl FromUpstream {
    fn poll<R, W, O>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        observer: &mut O,
    ) -> Poll<Result<(), RelayError>>
    where
        R: AsyncBufRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
        O: Observer,
    {
        if self.state.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.state.read_eof {
                return self.state.poll_finish(cx, writer).map_err(on(Side::Client));
            }
            let data = match Pin::new(&mut *reader).poll_fill_buf(cx) {
                Poll::Ready(Ok(data)) => data,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(on(Side::Upstream)(e))),
                Poll::Pending => {
                    self.state.waiting = true;
                    return self.state.poll_idle(cx, writer).map_err(on(Side::Client));
                }
            };
            self.state.waiting = false;
            if data.is_empty() {
                self.state.read_eof = true;
                continue;
            }
            let n = match self.state.poll_write(cx, writer, data) {
                Poll::Ready(r) => r.map_err(on(Side::Client))?,
                Poll::Pending => return Poll::Pending,
            };
            observer.upstream_bytes(&data[..n]);
            Pin::new(&mut *reader).consume(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, duplex};

    #[tokio::test]
    async fn relays_both_ways_and_counts_bytes() {
        let (mut client, mut client_end) = duplex(64);
        let (upstream_end, mut upstream) = duplex(64);
        let mut upstream_end = BufReader::new(upstream_end);
        let relay = tokio::spawn(async move { relay(&mut client_end, &mut upstream_end).await });

        let request = vec![7u8; 100_000];
        let response = vec![9u8; 250_000];
        let (client_got, upstream_got) = tokio::join!(
            async {
                client.write_all(&request).await.expect("client write");
                let mut got = vec![0u8; response.len()];
                client.read_exact(&mut got).await.expect("client read");
                client.shutdown().await.expect("client shutdown");
                got
            },
            async {
                let mut got = vec![0u8; request.len()];
                upstream.read_exact(&mut got).await.expect("upstream read");
                upstream.write_all(&response).await.expect("upstream write");
                let mut rest = Vec::new();
                upstream
                    .read_to_end(&mut rest)
                    .await
                    .expect("upstream sees EOF");
                assert!(rest.is_empty());
                drop(upstream);
                got
            }
        );
        assert!(
            client_got == response,
            "the client gets the upstream's bytes"
        );
        assert!(
            upstream_got == request,
            "the upstream gets the client's bytes"
        );
        let moved = relay.await.expect("join").expect("relay");
        assert_eq!(
            moved,
            Transferred {
                to_upstream: 100_000,
                to_client: 250_000
            }
        );
    }

    #[tokio::test]
    async fn ends_when_upstream_closes_and_closes_the_client() {
        let (mut client, mut client_end) = duplex(64);
        let (upstream_end, mut upstream) = duplex(64);
        let mut upstream_end = BufReader::new(upstream_end);
        let relay = tokio::spawn(async move { relay(&mut client_end, &mut upstream_end).await });
        upstream.write_all(b"bye").await.expect("write");
        upstream.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("client sees EOF");
        assert_eq!(got, b"bye");
        drop(client);
        let moved = relay.await.expect("join").expect("relay");
        assert_eq!(moved.to_client, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn says_which_side_closed_first_and_whose_socket_failed() {
        let (mut client, mut client_end) = duplex(64);
        let (upstream_end, _upstream) = duplex(64);
        let mut upstream_end = BufReader::new(upstream_end);
        let mut moved = Transferred::default();
        client.shutdown().await.expect("client closes");
        drop(client);
        let first = relay_counted(&mut client_end, &mut upstream_end, &mut moved)
            .await
            .expect("a clean end");
        assert_eq!(first, Side::Client);

        let (client, mut client_end) = duplex(64);
        let (upstream_end, mut upstream) = duplex(64);
        let mut upstream_end = BufReader::new(upstream_end);
        drop(client); // writes to the client now fail
        upstream.write_all(b"late answer").await.expect("write");
        let e = relay_counted(&mut client_end, &mut upstream_end, &mut moved).await;
        match e {
            Ok(side) => assert_eq!(side, Side::Client, "the client went away first"),
            Err(e) => assert_eq!(e.side, Side::Client, "{e}"),
        }

        let (_client, mut client_end) = duplex(64);
        let (upstream_end, mut upstream) = duplex(64);
        let mut upstream_end = BufReader::new(upstream_end);
        upstream.shutdown().await.expect("upstream closes");
        let first = relay_counted(&mut client_end, &mut upstream_end, &mut moved)
            .await
            .expect("a clean end");
        assert_eq!(first, Side::Upstream);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_waiting_for_a_peer_that_never_closes() {
        let (mut client, mut client_end) = duplex(64);
        let (upstream_end, _upstream) = duplex(64);
        let mut upstream_end = BufReader::new(upstream_end);
        let relay = tokio::spawn(async move { relay(&mut client_end, &mut upstream_end).await });
        client.shutdown().await.expect("client closes");
        // The upstream neither answers nor closes: the relay ends after the grace.
        let moved = relay.await.expect("join").expect("relay");
        assert_eq!(moved, Transferred::default());
    }
}
