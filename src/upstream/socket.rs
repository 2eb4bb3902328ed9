//! The TCP socket under an upstream TLS session, movable between session
//! workers.
//!
//! Each session worker runs its own runtime with its own epoll
//! (`workers.rs`), and a tokio socket stays registered with the runtime
//! that created it. A pooled server session outlives its client and is
//! checked out next by a client that may live on another worker: left
//! where it was, every message of that session would be noticed by the
//! other worker's epoll and handed over with a cross-thread wake-up.
//! [`NodeSocket::rebind_here`] moves the registration to the calling
//! worker instead (an `epoll_ctl` delete and add), once per checkout.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::thread::{self, ThreadId};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A tokio TCP stream that remembers which thread's runtime it is
/// registered with.
#[derive(Debug)]
pub struct NodeSocket {
    /// `None` only if a rebind failed half-way; every operation then fails.
    tcp: Option<TcpStream>,
    owner: ThreadId,
}

fn moved_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the upstream socket was lost moving between session workers",
    )
}

impl NodeSocket {
    /// Wraps a stream registered with the current thread's runtime.
    pub fn new(tcp: TcpStream) -> NodeSocket {
        NodeSocket {
            tcp: Some(tcp),
            owner: thread::current().id(),
        }
    }

    /// Whether the socket is registered with another thread's runtime.
    pub fn is_foreign(&self) -> bool {
        self.owner != thread::current().id()
    }

    /// Registers the socket with the runtime of the calling thread (a no-op
    /// when it already is). Must be called inside a runtime, with no I/O of
    /// the socket in flight (its buffered state lives in the TLS layer and
    /// is kept).
    ///
    /// # Errors
    /// When the old runtime cannot let go of it or the new one cannot take
    /// it; the socket is then unusable and the session must be dropped.
    pub fn rebind_here(&mut self) -> io::Result<()> {
        if !self.is_foreign() {
            return Ok(());
        }
        let tcp = self.tcp.take().ok_or_else(moved_out)?;
        // `into_std` deregisters from the old runtime's epoll.
        self.tcp = Some(TcpStream::from_std(tcp.into_std()?)?);
        self.owner = thread::current().id();
        Ok(())
    }

    fn pinned(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        self.tcp.as_mut().map(Pin::new).ok_or_else(moved_out)
    }
}

impl AsRawFd for NodeSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }
}

impl AsyncRead for NodeSocket {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().pinned() {
            Ok(tcp) => tcp.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for NodeSocket {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().pinned() {
            Ok(tcp) => tcp.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().pinned() {
            Ok(tcp) => tcp.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.as_ref().is_some_and(TcpStream::is_write_vectored)
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().pinned() {
            Ok(tcp) => tcp.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().pinned() {
            Ok(tcp) => tcp.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A socket made on one current-thread runtime (thread) keeps working
    /// after it is rebound on another, and the first runtime may end.
    #[test]
    fn a_socket_moves_to_another_runtime_and_keeps_working() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 5];
            for _ in 0..2 {
                s.read_exact(&mut buf).unwrap();
                s.write_all(&buf).unwrap();
            }
        });
        let rt = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let mut socket = thread::spawn(move || {
            rt().block_on(async {
                let mut s = NodeSocket::new(TcpStream::connect(addr).await.unwrap());
                assert!(!s.is_foreign());
                s.write_all(b"first").await.unwrap();
                let mut buf = [0u8; 5];
                s.read_exact(&mut buf).await.unwrap();
                assert_eq!(&buf, b"first");
                s
            })
        })
        .join()
        .unwrap();
        // The first runtime and its thread are gone now.
        assert!(socket.is_foreign());
        rt().block_on(async {
            socket.rebind_here().unwrap();
            assert!(!socket.is_foreign());
            socket.write_all(b"again").await.unwrap();
            let mut buf = [0u8; 5];
            socket.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"again");
        });
        peer.join().unwrap();
    }
}
