//! Node selection as pure functions over a view of the node table: no I/O, no
//! clock, no randomness of their own (the caller hands in tie-break values).
//!
//! The order, best first:
//! 1. usable nodes (up, or not yet probed) of the preferred regions:
//!    `routing.region` when set, then the nearest region;
//! 2. usable nodes of the other regions, by region RTT (the lowest RTT of the
//!    region's up nodes); regions not measured yet last, in config order;
//! 3. as a last resort, nodes in their hold-off after refusing a session
//!    (draining), then down nodes, each by their last RTT.
//!
//! Within a region: fewest sessions (active plus being dialed), then the
//! caller's random tie-break. Not-yet-probed nodes count as up here, so that a
//! burst of sessions at start-up spreads evenly while the first probes run.
//!
//! The nearest region has hysteresis: it changes only when another region is
//! clearly nearer ([`SWITCH_MARGIN_RATIO`] and [`SWITCH_MARGIN_MIN`]), so
//! regions with near-equal RTTs do not flap.

use std::cmp::Ordering;
use std::time::Duration;

use super::Status;

/// A region must be this much nearer (as a fraction of the current nearest
/// region's RTT) to become the nearest region.
pub const SWITCH_MARGIN_RATIO: f64 = 0.2;
/// ... and at least this much nearer in absolute terms.
/// Differences below a few milliseconds are one data centre's jitter (and, on
/// a loaded host, the prober's own scheduling), not a nearer region.
pub const SWITCH_MARGIN_MIN: Duration = Duration::from_millis(5);

/// One node as selection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub region: &'a str,
    pub status: Status,
    /// Smoothed probe RTT, when measured.
    pub rtt: Option<Duration>,
    /// Sessions running on the node plus dials in flight to it.
    pub load: usize,
    /// Random value that orders otherwise equal nodes.
    pub tiebreak: u64,
    /// In its hold-off after refusing a session before authentication.
    pub draining: bool,
}

impl Candidate<'_> {
    fn usable(&self) -> bool {
        self.status != Status::Down && !self.draining
    }
}

/// Indices into `candidates`, best first. Every candidate appears once; down
/// nodes come last.
///
/// `region` is `routing.region`; `nearest` is the current nearest region (see
/// [`nearest_region`]).
pub fn order(
    candidates: &[Candidate<'_>],
    region: Option<&str>,
    nearest: Option<&str>,
) -> Vec<usize> {
    let regions = rank_regions(candidates, region, nearest);
    let rank_of = |r: &str| regions.iter().position(|x| *x == r).unwrap_or(usize::MAX);
    let mut usable: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].usable())
        .collect();
    usable.sort_by(|&a, &b| {
        let (ca, cb) = (&candidates[a], &candidates[b]);
        rank_of(ca.region)
            .cmp(&rank_of(cb.region))
            .then_with(|| ca.load.cmp(&cb.load))
            .then_with(|| ca.tiebreak.cmp(&cb.tiebreak))
            .then_with(|| a.cmp(&b))
    });
    let mut down: Vec<usize> = (0..candidates.len())
        .filter(|&i| !candidates[i].usable())
        .collect();
    down.sort_by(|&a, &b| {
        let (ca, cb) = (&candidates[a], &candidates[b]);
        (ca.status == Status::Down)
            .cmp(&(cb.status == Status::Down))
            .then_with(|| cmp_rtt(ca.rtt, cb.rtt))
            .then_with(|| a.cmp(&b))
    });
    usable.extend(down);
    usable
}

/// Regions that have a usable node, best first: `region`, then `nearest`,
/// then the rest by region RTT (unmeasured last, in order of first appearance).
pub fn rank_regions<'a>(
    candidates: &[Candidate<'a>],
    region: Option<&str>,
    nearest: Option<&str>,
) -> Vec<&'a str> {
    let mut regions: Vec<(&'a str, Option<Duration>, usize)> = Vec::new();
    for (i, c) in candidates.iter().enumerate() {
        if !c.usable() || regions.iter().any(|(r, ..)| *r == c.region) {
            continue;
        }
        regions.push((c.region, region_rtt(candidates, c.region), i));
    }
    let preference = |r: &str| {
        if Some(r) == region {
            0
        } else if Some(r) == nearest {
            1
        } else {
            2
        }
    };
    regions.sort_by(|a, b| {
        preference(a.0)
            .cmp(&preference(b.0))
            .then_with(|| cmp_rtt(a.1, b.1))
            .then_with(|| a.2.cmp(&b.2))
    });
    regions.into_iter().map(|(r, ..)| r).collect()
}

/// The region with the lowest RTT, keeping `current` unless another region is
/// clearly nearer. `None` while no up node has a measured RTT.
pub fn nearest_region<'a>(candidates: &[Candidate<'a>], current: Option<&str>) -> Option<&'a str> {
    let mut best: Option<(&'a str, Duration)> = None;
    let mut current_rtt = None;
    for c in candidates {
        let Some(rtt) = region_rtt(candidates, c.region) else {
            continue;
        };
        if Some(c.region) == current {
            current_rtt = Some((c.region, rtt));
        }
        if best.is_none_or(|(_, b)| rtt < b) {
            best = Some((c.region, rtt));
        }
    }
    match (best, current_rtt) {
        (Some((_, new)), Some((kept, old))) if !clearly_nearer(new, old) => Some(kept),
        (best, _) => best.map(|(r, _)| r),
    }
}

/// Whether `new` beats `old` by the switch margin.
pub fn clearly_nearer(new: Duration, old: Duration) -> bool {
    let margin = old.mul_f64(SWITCH_MARGIN_RATIO).max(SWITCH_MARGIN_MIN);
    new.saturating_add(margin) <= old
}

/// The lowest smoothed RTT among the up nodes of `region`.
fn region_rtt(candidates: &[Candidate<'_>], region: &str) -> Option<Duration> {
    candidates
        .iter()
        .filter(|c| c.region == region && c.status == Status::Up)
        .filter_map(|c| c.rtt)
        .min()
}

/// Measured before unmeasured, then lower first.
fn cmp_rtt(a: Option<Duration>, b: Option<Duration>) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => a.cmp(&b),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Status::{Down, Unknown, Up};

    fn ms(n: u64) -> Option<Duration> {
        Some(Duration::from_millis(n))
    }

    fn node(
        region: &'static str,
        status: Status,
        rtt: Option<Duration>,
        load: usize,
    ) -> Candidate<'static> {
        Candidate {
            region,
            status,
            rtt,
            load,
            tiebreak: 0,
            draining: false,
        }
    }

    fn draining(mut c: Candidate<'static>) -> Candidate<'static> {
        c.draining = true;
        c
    }

    fn tied(mut c: Candidate<'static>, tiebreak: u64) -> Candidate<'static> {
        c.tiebreak = tiebreak;
        c
    }

    struct Case {
        name: &'static str,
        nodes: Vec<Candidate<'static>>,
        region: Option<&'static str>,
        nearest: Option<&'static str>,
        want: Vec<usize>,
    }

    #[test]
    fn orders_candidates_by_region_health_rtt_and_load() {
        let ms = |n| Some(Duration::from_millis(n));
        let cases = vec![
            Case {
                name: "a draining node goes after every usable one, before down ones",
                nodes: vec![
                    node("a", Status::Down, ms(1), 0),
                    draining(node("a", Status::Up, ms(1), 0)),
                    node("b", Status::Up, ms(50), 9),
                    node("a", Status::Up, ms(2), 5),
                ],
                region: Some("a"),
                nearest: None,
                want: vec![3, 2, 1, 0],
            },
            Case {
                name: "no nodes",
                nodes: vec![],
                region: Some("a"),
                nearest: None,
                want: vec![],
            },
            Case {
                name: "one region, least loaded first",
                nodes: vec![
                    node("a", Up, ms(5), 3),
                    node("a", Up, ms(9), 1),
                    node("a", Up, ms(1), 2),
                ],
                region: None,
                nearest: Some("a"),
                want: vec![1, 2, 0],
            },
            Case {
                name: "configured region first even when farther",
                nodes: vec![node("near", Up, ms(2), 0), node("home", Up, ms(50), 7)],
                region: Some("home"),
                nearest: Some("near"),
                want: vec![1, 0],
            },
            Case {
                name: "other regions by RTT after the configured one",
                nodes: vec![
                    node("c", Up, ms(60), 0),
                    node("b", Up, ms(20), 0),
                    node("home", Up, ms(40), 0),
                    node("d", Up, None, 0),
                ],
                region: Some("home"),
                nearest: None,
                want: vec![2, 1, 0, 3],
            },
            Case {
                name: "no region set: nearest region first, then by RTT",
                nodes: vec![
                    node("c", Up, ms(60), 0),
                    node("b", Up, ms(20), 0),
                    node("a", Up, ms(1), 0),
                ],
                region: None,
                nearest: Some("a"),
                want: vec![2, 1, 0],
            },
            Case {
                name: "hysteresis: the kept nearest region stays first",
                nodes: vec![node("a", Up, ms(10), 0), node("b", Up, ms(9), 0)],
                region: None,
                nearest: Some("a"),
                want: vec![0, 1],
            },
            Case {
                name: "configured region all down: next by RTT, down nodes last",
                nodes: vec![
                    node("home", Down, ms(1), 0),
                    node("far", Up, ms(80), 0),
                    node("mid", Up, ms(30), 0),
                ],
                region: Some("home"),
                nearest: Some("home"),
                want: vec![2, 1, 0],
            },
            Case {
                name: "all down: every node, by last RTT",
                nodes: vec![
                    node("a", Down, ms(30), 0),
                    node("b", Down, None, 0),
                    node("c", Down, ms(10), 0),
                ],
                region: Some("a"),
                nearest: None,
                want: vec![2, 0, 1],
            },
            Case {
                name: "before the first probe: configured region, then config order",
                nodes: vec![
                    node("x", Unknown, None, 0),
                    node("y", Unknown, None, 0),
                    node("home", Unknown, None, 0),
                ],
                region: Some("home"),
                nearest: None,
                want: vec![2, 0, 1],
            },
            Case {
                name: "not-yet-probed nodes share a region's load with up nodes",
                nodes: vec![node("a", Up, ms(3), 5), node("a", Unknown, None, 0)],
                region: Some("a"),
                nearest: None,
                want: vec![1, 0],
            },
            Case {
                name: "down node of the configured region goes after other regions",
                nodes: vec![
                    node("a", Down, ms(1), 0),
                    node("a", Up, ms(2), 9),
                    node("b", Up, ms(3), 0),
                ],
                region: Some("a"),
                nearest: Some("a"),
                want: vec![1, 2, 0],
            },
            Case {
                name: "ties on load broken by the tie-break value",
                nodes: vec![
                    tied(node("a", Up, ms(1), 2), 7),
                    tied(node("a", Up, ms(9), 2), 3),
                    tied(node("a", Up, ms(5), 2), 5),
                ],
                region: Some("a"),
                nearest: None,
                want: vec![1, 2, 0],
            },
            Case {
                name: "many regions, region RTT is its best up node",
                nodes: vec![
                    node("eu", Up, ms(90), 0),
                    node("us", Up, ms(40), 0),
                    node("eu", Up, ms(15), 4),
                    node("ap", Up, ms(200), 0),
                    node("us", Down, ms(1), 0),
                ],
                region: None,
                nearest: Some("eu"),
                want: vec![0, 2, 1, 3, 4],
            },
            Case {
                name: "nearest region that is now unusable is skipped",
                nodes: vec![node("a", Down, ms(1), 0), node("b", Up, ms(20), 0)],
                region: None,
                nearest: Some("a"),
                want: vec![1, 0],
            },
        ];
        assert!(!cases.is_empty());
        for case in cases {
            let got = order(&case.nodes, case.region, case.nearest);
            assert_eq!(got, case.want, "{}", case.name);
        }
    }

    #[test]
    fn random_tiebreak_spreads_equal_nodes() {
        let mut firsts = [0usize; 2];
        for tiebreak in 0..100u64 {
            let nodes = [
                tied(node("a", Up, ms(1), 0), tiebreak),
                tied(node("a", Up, ms(1), 0), 99 - tiebreak),
            ];
            firsts[order(&nodes, None, None)[0]] += 1;
        }
        assert_eq!(firsts, [50, 50]);
    }

    struct NearestCase {
        name: &'static str,
        nodes: Vec<Candidate<'static>>,
        current: Option<&'static str>,
        want: Option<&'static str>,
    }

    #[test]
    fn nearest_region_switches_only_by_a_clear_margin() {
        let cases = vec![
            NearestCase {
                name: "nothing measured",
                nodes: vec![node("a", Unknown, None, 0), node("b", Up, None, 0)],
                current: None,
                want: None,
            },
            NearestCase {
                name: "first measurement picks the lowest RTT",
                nodes: vec![
                    node("a", Up, ms(60), 0),
                    node("b", Up, ms(20), 0),
                    node("c", Up, ms(3), 0),
                ],
                current: None,
                want: Some("c"),
            },
            NearestCase {
                name: "near-equal: keep the current region",
                nodes: vec![node("a", Up, ms(20), 0), node("b", Up, ms(19), 0)],
                current: Some("a"),
                want: Some("a"),
            },
            NearestCase {
                name: "15% better is not enough",
                nodes: vec![node("a", Up, ms(100), 0), node("b", Up, ms(85), 0)],
                current: Some("a"),
                want: Some("a"),
            },
            NearestCase {
                name: "25% better switches",
                nodes: vec![node("a", Up, ms(100), 0), node("b", Up, ms(75), 0)],
                current: Some("a"),
                want: Some("b"),
            },
            NearestCase {
                name: "under the minimum margin is never a clear margin",
                nodes: vec![
                    node("a", Up, Some(Duration::from_micros(4900)), 0),
                    node("b", Up, Some(Duration::from_micros(300)), 0),
                ],
                current: Some("a"),
                want: Some("a"),
            },
            NearestCase {
                name: "current region down: switch at once",
                nodes: vec![
                    node("a", Down, ms(1), 0),
                    node("b", Up, ms(40), 0),
                    node("c", Up, ms(41), 0),
                ],
                current: Some("a"),
                want: Some("b"),
            },
            NearestCase {
                name: "region RTT is the best of its up nodes",
                nodes: vec![
                    node("a", Up, ms(50), 0),
                    node("a", Up, ms(10), 0),
                    node("b", Up, ms(30), 0),
                ],
                current: Some("b"),
                want: Some("a"),
            },
            NearestCase {
                name: "all down",
                nodes: vec![node("a", Down, ms(1), 0), node("b", Down, ms(2), 0)],
                current: Some("a"),
                want: None,
            },
        ];
        assert!(!cases.is_empty());
        for case in cases {
            assert_eq!(
                nearest_region(&case.nodes, case.current),
                case.want,
                "{}",
                case.name
            );
        }
    }

    #[test]
    fn rising_latency_moves_the_nearest_region_once() {
        // a's RTT climbs from 2ms to 200ms in steps; b sits at 40ms.
        let mut current = None;
        let mut switches = 0;
        for step in 0..100u64 {
            let nodes = [node("a", Up, ms(2 + step * 2), 0), node("b", Up, ms(40), 0)];
            let next = nearest_region(&nodes, current);
            if current.is_some() && next != current {
                switches += 1;
            }
            current = next;
        }
        assert_eq!(current, Some("b"));
        assert_eq!(switches, 1);
    }
}
