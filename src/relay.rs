//! The byte relay after the startup phase: both directions at once, with byte
//! counts and which side ended the session.

use tokio::io::{AsyncRead, AsyncWrite};

/// Buffer per direction. PostgreSQL writes in 8 KiB chunks; TLS records carry up
/// to 16 KiB.
pub const BUFFER_SIZE: usize = 16 * 1024;

/// Bytes moved each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    pub to_upstream: u64,
    pub to_client: u64,
}

/// Relays until either side closes; the other side's write half is shut down
/// when its peer finishes, so a close on one side reaches the other promptly.
///
/// Not cancel-safe in the sense of counts: if the future is dropped, the bytes
/// moved so far are not reported.
///
/// # Errors
/// The first I/O error on either side (reset, broken pipe, TLS error).
pub async fn relay<C, U>(client: &mut C, upstream: &mut U) -> std::io::Result<Transferred>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (to_upstream, to_client) =
        tokio::io::copy_bidirectional_with_sizes(client, upstream, BUFFER_SIZE, BUFFER_SIZE)
            .await?;
    Ok(Transferred {
        to_upstream,
        to_client,
    })
}
