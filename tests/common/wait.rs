//! Bounded waits: a whole test under a time limit ([`bounded`]), polling a
//! condition until it holds or a deadline passes ([`wait_until`], [`wait_for`],
//! and [`poll`] for blocking code), and checking that something does not
//! happen for a while ([`assert_stays`]). Tests wait for what they need, never for a
//! fixed time.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often the polling waits look again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Fails the test if `body` takes longer than `limit`.
pub async fn bounded<T>(limit: Duration, body: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
}

/// Polls `cond` every [`POLL_INTERVAL`] until it returns true; panics naming
/// `what` when it is still false after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(timeout, what, || {
        let check = cond();
        async move { check.await.then_some(()) }
    })
    .await;
}

/// Polls `probe` every [`POLL_INTERVAL`] until it returns `Some`; panics
/// naming `what` when it has not after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    try_wait_for(timeout, probe)
        .await
        .unwrap_or_else(|| panic!("{what}: not within {timeout:?}"))
}

/// Like [`wait_for`], but `None` (instead of a panic) after `timeout`.
pub async fn try_wait_for<T, F, Fut>(timeout: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls `probe` every 50 ms until it returns `Some`, for at most `timeout`;
/// for blocking code (threads, no runtime).
pub fn poll<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks `cond` every [`POLL_INTERVAL`] for `window` and panics naming `what`
/// the first time it is false: for "nothing happens" assertions, where there
/// is no event to wait for, only a time during which it must not occur.
pub async fn assert_stays<F, Fut>(window: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + window;
    loop {
        assert!(cond().await, "{what}");
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
