//! Node health: the pure state machine that turns probe and dial results into
//! up/down with hysteresis and a smoothed RTT, and the prober task that feeds it.
//!
//! Rules:
//! - a node is [`Status::Unknown`] until its first result, which decides at once
//!   (so the first probe round gives every node a state);
//! - an up node goes down after `unhealthy_after` consecutive failures (probes
//!   or dials by sessions);
//! - a down node comes up after `healthy_after` consecutive successes;
//! - the RTT is an exponentially weighted moving average ([`RTT_WEIGHT`] on
//!   each new sample) of probe times passed through a median of the last
//!   [`SPIKE_WINDOW`] probes, so that one slow probe (a retransmit, a busy
//!   node) does not move sessions to another region;
//! - probe evidence and session evidence are kept apart: a session's good dial
//!   only decides a node that has no result yet, and never clears a failing
//!   probe streak (a node whose readiness probe fails is out, however many
//!   sessions it still takes);
//! - a node that refused a session before authentication (57P01 draining,
//!   57P03 starting up, 53300 full …) is *draining*: it gets no new sessions
//!   for a hold-off of twice `health.interval`; after that, the next session
//!   is its trial: accepted, the node is back; refused again, the hold-off
//!   starts over. The TLS probe is no evidence here (a draining CockroachDB
//!   node still completes TLS); a failing readiness probe takes it down.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::probe::{self, ProbeSettings};
use super::{Node, Router, Status};
use crate::config::Config;

/// Weight of a new RTT sample in the moving average.
pub const RTT_WEIGHT: f64 = 0.3;
/// The moving average takes the median of this many latest probe times.
pub const SPIKE_WINDOW: usize = 3;

/// When a node changes state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub unhealthy_after: u32,
    pub healthy_after: u32,
    /// How long a node that refused a session gets no new ones.
    pub drain_hold_off: Duration,
}

impl Thresholds {
    pub fn from_config(health: &crate::config::HealthConfig) -> Self {
        Thresholds {
            unhealthy_after: health.unhealthy_after.max(1),
            healthy_after: health.healthy_after.max(1),
            drain_hold_off: health.interval.saturating_mul(2),
        }
    }
}

/// One probe or dial result.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// A probe completed: verified TLS (and readiness, when configured).
    ProbeOk {
        rtt: Duration,
        cert_expiry: Option<SystemTime>,
    },
    /// A session's dial completed its verified TLS handshake.
    DialOk,
    /// The node refused a session before authentication (why, and when).
    Refused { reason: Arc<str>, at: Instant },
    /// The node took a session: it asked for authentication.
    Accepted,
    /// A probe or a session's dial failed, for this reason.
    Failed { reason: Arc<str> },
}

/// What is known about one node, as of its last probe or dial.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeHealth {
    pub status: Status,
    /// Smoothed probe RTT (one round trip: SSLRequest and its answer).
    pub rtt: Option<Duration>,
    /// The latest raw probe times, oldest first (at most [`SPIKE_WINDOW`]).
    pub recent_rtts: Vec<Duration>,
    pub consecutive_successes: u32,
    pub consecutive_failures: u32,
    /// Why the last failure happened, for logs.
    pub last_error: Option<Arc<str>>,
    /// `notAfter` of the node's certificate, from the last good probe.
    pub cert_expiry: Option<SystemTime>,
    /// Set while the node refuses sessions: no new ones before this instant.
    pub draining_until: Option<Instant>,
}

impl Default for NodeHealth {
    fn default() -> Self {
        NodeHealth {
            status: Status::Unknown,
            rtt: None,
            recent_rtts: Vec::new(),
            consecutive_successes: 0,
            consecutive_failures: 0,
            last_error: None,
            cert_expiry: None,
            draining_until: None,
        }
    }
}

impl NodeHealth {
    /// Whether the node is in its hold-off after refusing a session.
    pub fn is_draining(&self, now: Instant) -> bool {
        self.draining_until.is_some_and(|until| now < until)
    }

    /// The state after `observation`.
    #[must_use]
    pub fn observe(&self, observation: &Observation, thresholds: Thresholds) -> NodeHealth {
        let mut next = self.clone();
        match observation {
            // Session evidence decides only a node nothing is known of yet.
            Observation::DialOk if self.status == Status::Unknown => {
                next.status = Status::Up;
            }
            Observation::DialOk => {}
            Observation::Refused { reason, at } => {
                next.draining_until = Some(*at + thresholds.drain_hold_off);
                next.last_error = Some(Arc::clone(reason));
            }
            Observation::Accepted => next.draining_until = None,
            Observation::ProbeOk { .. } => {
                next.consecutive_failures = 0;
                next.consecutive_successes = self.consecutive_successes.saturating_add(1);
                next.status = match self.status {
                    Status::Unknown | Status::Up => Status::Up,
                    Status::Down if next.consecutive_successes >= thresholds.healthy_after => {
                        Status::Up
                    }
                    Status::Down => Status::Down,
                };
                if let Observation::ProbeOk { rtt, cert_expiry } = observation {
                    if next.recent_rtts.len() == SPIKE_WINDOW {
                        next.recent_rtts.remove(0);
                    }
                    next.recent_rtts.push(*rtt);
                    next.rtt = Some(smooth(self.rtt, median_low(&next.recent_rtts)));
                    next.cert_expiry = cert_expiry.or(self.cert_expiry);
                }
            }
            Observation::Failed { reason } => {
                next.consecutive_successes = 0;
                next.consecutive_failures = self.consecutive_failures.saturating_add(1);
                next.last_error = Some(Arc::clone(reason));
                next.status = match self.status {
                    Status::Unknown | Status::Down => Status::Down,
                    Status::Up if next.consecutive_failures >= thresholds.unhealthy_after => {
                        Status::Down
                    }
                    Status::Up => Status::Up,
                };
            }
        }
        next
    }
}

/// The median of `samples` (the lower middle one for an even count).
fn median_low(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    sorted
        .get(sorted.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or_default()
}

/// The moving average after `sample`.
fn smooth(previous: Option<Duration>, sample: Duration) -> Duration {
    match previous {
        None => sample,
        Some(previous) => previous.mul_f64(1.0 - RTT_WEIGHT) + sample.mul_f64(RTT_WEIGHT),
    }
}

/// The running health probes, one task per node; stopped by [`Prober::stop`]
/// or on drop.
#[derive(Debug)]
pub struct Prober {
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Prober {
    /// Starts probing every node of `router` every `health.interval`, each
    /// probe bounded by `health.timeout`. The first round starts at once.
    pub fn spawn(router: Arc<Router>, config: &Config) -> Prober {
        let settings = Arc::new(ProbeSettings::new(
            &config.upstream,
            &config.health,
            config.health.timeout,
        ));
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        for node in router.nodes() {
            tasks.spawn(probe_loop(
                Arc::clone(&router),
                node,
                Arc::clone(&settings),
                config.health.interval,
                stop.clone(),
            ));
        }
        tasks.close();
        Prober { stop, tasks }
    }

    /// Stops the probes and waits for them to end.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn probe_loop(
    router: Arc<Router>,
    node: Arc<Node>,
    settings: Arc<ProbeSettings>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let result = tokio::select! {
            () = stop.cancelled() => return,
            result = probe::probe(&node.config, &settings) => result,
        };
        let observation = match result {
            Ok(ok) => {
                tracing::trace!(node = %node.id(), rtt_ms = ok.rtt.as_secs_f64() * 1000.0, "probe ok");
                Observation::ProbeOk {
                    rtt: ok.rtt,
                    cert_expiry: ok.cert_expiry,
                }
            }
            Err(e) => {
                let reason = probe::advice(&e, &settings.ca_file);
                tracing::debug!(node = %node.id(), region = %node.config.region, error = %reason, "probe failed");
                Observation::Failed {
                    reason: reason.into(),
                }
            }
        };
        router.observe(node.id(), &observation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        unhealthy_after: 2,
        healthy_after: 3,
        drain_hold_off: Duration::from_secs(4),
    };

    #[test]
    fn a_refusing_node_drains_for_the_hold_off_then_gets_a_trial() {
        let start = Instant::now();
        let refused = |at| Observation::Refused {
            reason: "57P01 server is not accepting clients".into(),
            at,
        };
        let h = NodeHealth::default().observe(&ok(1), T);
        assert!(!h.is_draining(start));
        let h = h.observe(&refused(start), T);
        assert_eq!(h.status, Status::Up, "draining is not down");
        assert!(h.is_draining(start + Duration::from_secs(3)));
        assert!(
            !h.is_draining(start + Duration::from_secs(4)),
            "after the hold-off the next session is a trial"
        );
        let again = h.observe(&refused(start + Duration::from_secs(5)), T);
        assert!(
            again.is_draining(start + Duration::from_secs(8)),
            "refused again: the hold-off starts over"
        );
        assert!(
            again.observe(&ok(1), T).draining_until.is_some(),
            "a TLS probe is no evidence"
        );
        assert!(!again.observe(&Observation::Accepted, T).is_draining(start));
    }

    fn ok(ms: u64) -> Observation {
        Observation::ProbeOk {
            rtt: Duration::from_millis(ms),
            cert_expiry: None,
        }
    }

    fn fail() -> Observation {
        Observation::Failed {
            reason: "refused".into(),
        }
    }

    fn run(steps: &[Observation]) -> Vec<Status> {
        let mut h = NodeHealth::default();
        steps
            .iter()
            .map(|o| {
                h = h.observe(o, T);
                h.status
            })
            .collect()
    }

    #[test]
    fn status_follows_thresholds() {
        use Status::{Down, Up};
        let cases: Vec<(&str, Vec<Observation>, Vec<Status>)> = vec![
            ("first success decides up", vec![ok(1)], vec![Up]),
            ("first failure decides down", vec![fail()], vec![Down]),
            (
                "a first dial success counts",
                vec![Observation::DialOk],
                vec![Up],
            ),
            (
                "a dial success never clears a failing probe streak",
                vec![ok(1), fail(), Observation::DialOk, fail()],
                vec![Up, Up, Up, Down],
            ),
            (
                "nor brings a down node up",
                vec![
                    fail(),
                    Observation::DialOk,
                    Observation::DialOk,
                    Observation::DialOk,
                ],
                vec![Down, Down, Down, Down],
            ),
            (
                "up survives one failure, falls on the second",
                vec![ok(1), fail(), fail()],
                vec![Up, Up, Down],
            ),
            (
                "failures must be consecutive",
                vec![ok(1), fail(), ok(1), fail(), ok(1)],
                vec![Up, Up, Up, Up, Up],
            ),
            (
                "down needs three successes in a row",
                vec![fail(), ok(1), ok(1), fail(), ok(1), ok(1), ok(1)],
                vec![Down, Down, Down, Down, Down, Down, Up],
            ),
        ];
        assert!(!cases.is_empty());
        for (name, steps, want) in cases {
            assert_eq!(run(&steps), want, "{name}");
        }
    }

    fn rtt_after(samples: &[u64]) -> Duration {
        let mut h = NodeHealth::default();
        for &ms in samples {
            h = h.observe(&ok(ms), T);
        }
        h.rtt.expect("measured")
    }

    fn close_to(got: Duration, want_ms: f64) -> bool {
        (got.as_secs_f64() * 1000.0 - want_ms).abs() < 0.01
    }

    #[test]
    fn rtt_is_a_moving_average_of_filtered_probe_times() {
        let cases: Vec<(&str, Vec<u64>, f64)> = vec![
            ("first sample", vec![10], 10.0),
            ("steady", vec![10, 10, 10, 10], 10.0),
            ("one spike is ignored", vec![10, 10, 500, 10, 10], 10.0),
            (
                "a step is followed from its second sample",
                vec![10, 10, 110, 110],
                40.0,
            ),
            (
                "and converges",
                vec![10, 10, 110, 110, 110, 110, 110, 110, 110],
                98.2351,
            ),
            ("a drop is followed too", vec![100, 100, 10, 10], 73.0),
        ];
        assert!(!cases.is_empty());
        for (name, samples, want) in cases {
            let got = rtt_after(&samples);
            assert!(close_to(got, want), "{name}: {got:?}, want {want}ms");
        }
    }

    #[test]
    fn dials_and_failures_leave_the_rtt_alone() {
        let h = NodeHealth::default()
            .observe(&ok(10), T)
            .observe(&Observation::DialOk, T)
            .observe(&fail(), T);
        assert_eq!(h.rtt, Some(Duration::from_millis(10)));
        assert_eq!(h.last_error.as_deref(), Some("refused"));
    }

    #[test]
    fn keeps_the_last_known_certificate_expiry() {
        let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(3_000_000_000);
        let h = NodeHealth::default()
            .observe(
                &Observation::ProbeOk {
                    rtt: Duration::from_millis(1),
                    cert_expiry: Some(expiry),
                },
                T,
            )
            .observe(&ok(1), T);
        assert_eq!(h.cert_expiry, Some(expiry));
    }
}
