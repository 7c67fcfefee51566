//! The orchestrator: starts the loops (and the Redis publisher), moves the run through its
//! phases, samples CPU and memory at the edges of the measured window, and builds the
//! [`Report`] with its warnings.
//!
//! Threads share only `Shared`: atomics for the phase, the schedule and the progress
//! counters. The orchestrator watches those counters every few milliseconds; nothing on the
//! per-frame path touches a shared cache line except once per loop turn.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::payload::now_nanos;
use super::stats::{Histogram, SeqCounts};
use super::worker::{PublisherStats, Worker, WorkerResult};
use super::{GeneratorReport, LoadConfig, PublisherReport, Report, ServerReport, redis_pub, sys};

/// Descriptors kept free for everything that is not a connection (Redis, /proc reads, poll).
const FD_RESERVE: usize = 64;
/// How often the orchestrator looks at the counters.
const WATCH: Duration = Duration::from_millis(5);
/// A loop thread busier than this during the window was the bottleneck.
const SATURATED: f64 = 0.9;

/// The phases of a run, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    /// Opening connections.
    Connect,
    /// Probing until every connection provably receives its channel.
    Probe,
    /// Publishing (warmup, then the measured window).
    Run,
    /// Publishing is over; waiting for deliveries in flight.
    Drain,
    /// Stop.
    Done,
}

/// When each message is due: message `i` of the run (all channels interleaved) is due at
/// `start + i / rate` and goes to channel `i % channels` as that channel's message number
/// `i / channels`. Nothing is due at or after `end`.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// Due time of message 0, ns (CLOCK_MONOTONIC).
    pub start: u64,
    /// End of publishing, ns.
    pub end: u64,
    /// Channels.
    pub channels: u64,
    /// Messages per second, all channels.
    pub rate: f64,
}

impl Schedule {
    /// Due time of channel `c`'s message `seq`; `u64::MAX` at rate 0.
    #[inline]
    pub fn at(&self, c: usize, seq: u64) -> u64 {
        if self.rate <= 0.0 {
            return u64::MAX;
        }
        let i = seq * self.channels + c as u64;
        self.start + (i as f64 * 1e9 / self.rate) as u64
    }

    /// Messages due before `end`, all channels.
    pub fn total(&self) -> u64 {
        let span = self.end.saturating_sub(self.start) as f64 / 1e9;
        (span * self.rate).ceil() as u64
    }
}

/// State shared by the orchestrator, the loops and the Redis publisher.
pub(super) struct Shared {
    pub cfg: LoadConfig,
    phase: AtomicU8,
    start: AtomicU64,
    pub measure_from: AtomicU64,
    end: AtomicU64,
    /// Messages sent per channel (the next sequence number).
    pub sent: Vec<AtomicU64>,
    pub open: AtomicUsize,
    pub failed: AtomicUsize,
    pub live: AtomicUsize,
    pub dropped: AtomicUsize,
    pub publishers_done: AtomicUsize,
    pub drained_flags: Vec<AtomicBool>,
    pub received: AtomicU64,
    /// Observe mode: the measured window's start, from the first message seen.
    pub first_measured: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Connect,
            1 => Phase::Probe,
            2 => Phase::Run,
            3 => Phase::Drain,
            _ => Phase::Done,
        }
    }

    fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
    }

    pub fn schedule(&self) -> Schedule {
        Schedule {
            start: self.start.load(Ordering::Acquire),
            end: self.end.load(Ordering::Acquire),
            channels: self.cfg.channels as u64,
            rate: self.cfg.rate,
        }
    }

    /// Keeps the first error: later ones are usually the same cause again.
    pub fn note_error(&self, why: String) {
        let mut e = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_none() {
            *e = Some(why);
        }
    }
}

/// Polls `done` every few ms until it is true or `timeout` passes. True if it became true.
fn watch(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(WATCH);
    }
}

fn sleep_until_nanos(t: u64) {
    let now = now_nanos();
    if t > now {
        std::thread::sleep(Duration::from_nanos(t - now));
    }
}

/// Samples of the servers at one instant.
fn sample_servers(pids: &[u32]) -> Vec<(Duration, u64)> {
    pids.iter()
        .map(|&p| {
            (
                sys::proc_cpu(p).unwrap_or_default(),
                sys::proc_rss(p).unwrap_or_default(),
            )
        })
        .collect()
}

/// Stops the threads however the run ends, so an error never leaves loops spinning.
struct Threads {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<std::io::Result<WorkerResult>>>,
    redis: Option<JoinHandle<Result<PublisherStats, String>>>,
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.shared.set_phase(Phase::Done);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if let Some(r) = self.redis.take() {
            let _ = r.join();
        }
    }
}

/// Runs the load described by `cfg` and reports what it measured. Errors are for runs that
/// could not measure anything meaningful (nothing connected, subscriptions never live, a bad
/// configuration); everything else is reported, with warnings.
pub fn run(cfg: LoadConfig) -> Result<Report, String> {
    run_with_progress(cfg, |_| {})
}

/// [`run`], telling `progress` about each phase as it ends (one line each). An observer's
/// `ready: …` line is the signal to start the publishing generator.
pub fn run_with_progress(cfg: LoadConfig, mut progress: impl FnMut(&str)) -> Result<Report, String> {
    cfg.validate()?;
    sys::ensure_fd_room(cfg.connections, FD_RESERVE)?;
    let pids = cfg.server_pids.clone();
    for &p in &pids {
        sys::proc_rss(p).map_err(|e| format!("--server-pid {p}: {e}"))?;
    }
    let before = sample_servers(&pids);
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(Phase::Connect as u8),
        start: AtomicU64::new(0),
        measure_from: AtomicU64::new(0),
        end: AtomicU64::new(0),
        sent: (0..cfg.channels).map(|_| AtomicU64::new(0)).collect(),
        open: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        live: AtomicUsize::new(0),
        dropped: AtomicUsize::new(0),
        publishers_done: AtomicUsize::new(0),
        drained_flags: (0..cfg.threads).map(|_| AtomicBool::new(false)).collect(),
        received: AtomicU64::new(0),
        first_measured: AtomicU64::new(0),
        first_error: Mutex::new(None),
        cfg,
    });
    let cfg = &shared.cfg;
    let mut threads = Threads {
        shared: shared.clone(),
        workers: Vec::new(),
        redis: None,
    };
    if let Some(url) = &cfg.publish_via {
        let body = redis_pub::start(shared.clone(), url)?;
        threads.redis = Some(
            std::thread::Builder::new()
                .name("load-redis-pub".into())
                .spawn(body)
                .map_err(|e| format!("cannot start the publisher thread: {e}"))?,
        );
    }
    for id in 0..cfg.threads {
        let w = Worker::new(id, shared.clone()).map_err(|e| format!("cannot create poll: {e}"))?;
        threads.workers.push(
            std::thread::Builder::new()
                .name(format!("load-{id}"))
                .spawn(move || w.run())
                .map_err(|e| format!("cannot start loop thread: {e}"))?,
        );
    }

    // Connect.
    let setup = Instant::now();
    let n = cfg.connections;
    watch(cfg.connect_timeout, || {
        shared.open.load(Ordering::Acquire) + shared.failed.load(Ordering::Acquire) >= n
    });
    let established = shared.open.load(Ordering::Acquire);
    progress(&format!(
        "connected {established} of {n} in {:.1} s",
        setup.elapsed().as_secs_f64()
    ));
    let first_error = || shared.first_error.lock().ok().and_then(|e| e.clone());
    if established == 0 {
        return Err(format!(
            "no connection was established: {}",
            first_error().unwrap_or_else(|| "timed out".into())
        ));
    }
    if !cfg.observe && cfg.publish_via.is_none() {
        // Each channel's first connection publishes: without it the channel has no traffic.
        let publishers_lost = shared.failed.load(Ordering::Acquire) > 0 && {
            // Cheap check at the end; here only fail when nothing could publish at all.
            established < cfg.channels
        };
        if publishers_lost {
            return Err(format!(
                "only {established} connections for {} channels: every channel needs its publisher ({})",
                cfg.channels,
                first_error().unwrap_or_default()
            ));
        }
    }

    // Probe: every open connection must receive a probe on its channel.
    shared.set_phase(Phase::Probe);
    let all_live = watch(cfg.connect_timeout, || {
        shared.live.load(Ordering::Acquire) + shared.dropped.load(Ordering::Acquire)
            >= shared.open.load(Ordering::Acquire)
    });
    if !all_live {
        return Err(format!(
            "{} of {} open connections never received a probe on their channel within {:?}: \
             their subscriptions are not live (is --publish-via the server's Redis, and do \
             --redis-prefix/--default-channel match the server's?)",
            shared.open.load(Ordering::Acquire) - shared.live.load(Ordering::Acquire),
            shared.open.load(Ordering::Acquire),
            cfg.connect_timeout
        ));
    }
    let setup_secs = setup.elapsed().as_secs_f64();
    let connected = sample_servers(&pids);
    progress(&format!(
        "ready: {} connections live in {setup_secs:.1} s",
        shared.live.load(Ordering::Acquire)
    ));

    // Run: the schedule starts a little ahead so every publisher sees it before it is due.
    let start = now_nanos() + 20_000_000;
    let measure_from = start + cfg.warmup.as_nanos() as u64;
    let end = measure_from + cfg.duration.as_nanos() as u64;
    shared.start.store(start, Ordering::Release);
    shared.measure_from.store(measure_from, Ordering::Release);
    shared.end.store(end, Ordering::Release);
    let publishers = if cfg.observe {
        0
    } else if cfg.publish_via.is_some() {
        1
    } else {
        (0..cfg.threads).filter(|&t| t < cfg.channels).count()
    };
    shared.set_phase(Phase::Run);
    if !cfg.observe {
        progress(&format!("publishing for {:?} + {:?}", cfg.warmup, cfg.duration));
    }

    let (window_start, window_end, at_start, at_end, self_cpu);
    if cfg.observe {
        // The window starts `warmup` after the first message; it ends when deliveries stop.
        let got_first = watch(cfg.connect_timeout + cfg.warmup + cfg.duration, || {
            shared.first_measured.load(Ordering::Acquire) != 0
        });
        if !got_first {
            return Err("observe: no message arrived (start the publishing generator)".into());
        }
        sleep_until_nanos(shared.first_measured.load(Ordering::Acquire));
        window_start = Instant::now();
        at_start = (sample_servers(&pids), sys::process_cpu());
        let mut last = shared.received.load(Ordering::Acquire);
        let mut last_change = Instant::now();
        watch(Duration::MAX / 4, || {
            let now = shared.received.load(Ordering::Acquire);
            if now != last {
                last = now;
                last_change = Instant::now();
            }
            last_change.elapsed() >= cfg.drain
        });
        window_end = last_change;
        at_end = (sample_servers(&pids), sys::process_cpu());
    } else {
        sleep_until_nanos(measure_from);
        window_start = Instant::now();
        at_start = (sample_servers(&pids), sys::process_cpu());
        sleep_until_nanos(end);
        watch(Duration::from_secs(5), || {
            shared.publishers_done.load(Ordering::Acquire) >= publishers
        });
        shared.set_phase(Phase::Drain);
        watch(cfg.drain, || {
            shared.drained_flags.iter().all(|f| f.load(Ordering::Acquire))
        });
        window_end = Instant::now();
        at_end = (sample_servers(&pids), sys::process_cpu());
    }
    self_cpu = at_end.1.saturating_sub(at_start.1);
    let window = window_end.saturating_duration_since(window_start);
    shared.set_phase(Phase::Done);

    // Collect.
    let mut results = Vec::new();
    for w in threads.workers.drain(..) {
        match w.join() {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => return Err(format!("a loop failed: {e}")),
            Err(_) => return Err("a loop thread panicked".into()),
        }
    }
    let mut publisher = PublisherStats::default();
    if let Some(r) = threads.redis.take() {
        match r.join() {
            Ok(Ok(p)) => publisher.merge(&p),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("the publisher thread panicked".into()),
        }
    }
    drop(threads);

    let servers: Vec<ServerReport> = pids
        .iter()
        .enumerate()
        .map(|(i, &pid)| {
            let cpu = at_end.0[i].0.saturating_sub(at_start.0[i].0).as_secs_f64();
            ServerReport {
                pid,
                cpu_secs: cpu,
                cpu_busy: cpu / window.as_secs_f64().max(1e-9),
                rss_before: before[i].1,
                rss_connected: connected[i].1,
                rss_end: at_end.0[i].1,
            }
        })
        .collect();
    Ok(build_report(
        &shared,
        results,
        publisher,
        servers,
        established,
        setup_secs,
        window,
        self_cpu,
        first_error(),
    ))
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    shared: &Shared,
    results: Vec<WorkerResult>,
    mut publisher: PublisherStats,
    servers: Vec<ServerReport>,
    established: usize,
    setup_secs: f64,
    window: Duration,
    self_cpu: Duration,
    first_error: Option<String>,
) -> Report {
    let cfg = &shared.cfg;
    let sent: Vec<u64> = shared.sent.iter().map(|s| s.load(Ordering::Acquire)).collect();
    let mut hist = Histogram::default();
    let mut r = Report {
        targets: cfg
            .targets
            .iter()
            .map(|t| format!("{}{}", t.host, cfg.channel_path(t, 0)))
            .collect(),
        connections: cfg.connections,
        established,
        connect_failed: shared.failed.load(Ordering::Acquire),
        first_error,
        setup_secs,
        channels: cfg.channels,
        rate: cfg.rate,
        size: cfg.size,
        window_secs: window.as_secs_f64(),
        observe: cfg.observe,
        ..Report::default()
    };
    // In observe mode the publisher is elsewhere: what it sent is inferred from the highest
    // sequence number any connection here saw on each channel.
    let mut high = vec![0u64; cfg.channels];
    for w in &results {
        for (c, t, _) in &w.conns {
            high[*c as usize] = high[*c as usize].max(t.high());
        }
    }
    let sent = if cfg.observe { high } else { sent };
    let mut subscribers = vec![0u64; cfg.channels];
    let mut busy = Vec::new();
    for w in &results {
        hist.merge(&w.hist);
        r.measured += w.measured;
        r.misrouted += w.misrouted;
        r.foreign += w.foreign;
        r.fragmented += w.fragmented;
        r.dropped += w.dropped;
        r.pings += w.pings;
        publisher.merge(&w.publisher);
        busy.push(w.busy);
        for (c, t, est) in &w.conns {
            if *est {
                let s = sent[*c as usize];
                r.expected += s;
                r.counts += t.finish(s);
                subscribers[*c as usize] += 1;
            } else {
                r.counts += SeqCounts {
                    received: t.received(),
                    ..SeqCounts::default()
                };
            }
        }
    }
    r.latency = hist.summary();
    let secs = window.as_secs_f64().max(1e-9);
    // Deliveries per second over the span they were received in: from the window's start to
    // the last one (the drain's idle tail would understate the rate).
    let from = if cfg.observe {
        shared.first_measured.load(Ordering::Acquire)
    } else {
        shared.measure_from.load(Ordering::Acquire)
    };
    let last = results.iter().map(|w| w.last_receipt).max().unwrap_or(0);
    let span = if last > from {
        (last - from) as f64 / 1e9
    } else {
        secs
    };
    r.deliveries_per_sec = r.measured as f64 / span;
    let avg_subs = subscribers.iter().sum::<u64>() as f64 / cfg.channels as f64;
    r.offered_deliveries_per_sec = cfg.rate * avg_subs;

    if !cfg.observe {
        let sched = shared.schedule();
        let scheduled = sched.total();
        // One late send is a scheduling hiccup (another process had the core); more than 1 %
        // of them, or messages never sent, is a publisher that could not keep up.
        let behind = publisher.late_sends * 100 > publisher.sent || publisher.sent < scheduled;
        r.publisher = Some(PublisherReport {
            scheduled,
            sent: publisher.sent,
            max_lateness_ms: publisher.max_lateness_ns as f64 / 1e6,
            late_sends: publisher.late_sends,
            behind,
        });
        if behind {
            r.warnings.push(format!(
                "the publisher fell behind its schedule ({} of {scheduled} sent, {} sends over \
                 10 ms late, worst {:.1} ms): the generator or the publishing path was the \
                 bottleneck, not only the server",
                publisher.sent,
                publisher.late_sends,
                publisher.max_lateness_ns as f64 / 1e6
            ));
        }
    }

    let saturated = busy.iter().any(|&b| b >= SATURATED);
    r.generator = GeneratorReport {
        threads: cfg.threads,
        cpu_secs: self_cpu.as_secs_f64(),
        thread_busy: busy,
        saturated,
    };
    if saturated {
        r.warnings.push(format!(
            "a generator loop thread was busy {:.0}% of the window: the generator was the \
             bottleneck and these numbers measure it, not the server (use --threads, fewer \
             connections, or another core)",
            r.generator.thread_busy.iter().cloned().fold(0.0, f64::max) * 100.0
        ));
    }

    r.server_cpu_secs = servers.iter().map(|s| s.cpu_secs).sum();
    if r.server_cpu_secs > 0.0 && r.measured > 0 {
        r.deliveries_per_server_cpu_sec = r.measured as f64 / r.server_cpu_secs;
        r.server_cpu_secs_per_million = r.server_cpu_secs / (r.measured.max(1) as f64 / 1e6);
    }
    let growth: i64 = servers
        .iter()
        .map(|s| s.rss_connected as i64 - s.rss_before as i64)
        .sum();
    r.rss_bytes_per_connection = growth as f64 / established.max(1) as f64;
    r.servers = servers;

    if r.established < r.connections {
        r.warnings.push(format!(
            "only {} of {} connections were established ({})",
            r.established,
            r.connections,
            r.first_error.clone().unwrap_or_else(|| "timed out".into())
        ));
    }
    if r.counts.lost > 0 || r.counts.reordered > 0 || r.counts.duplicates > 0 {
        r.warnings.push(format!(
            "delivery was not exact: {} lost, {} reordered, {} duplicated",
            r.counts.lost, r.counts.reordered, r.counts.duplicates
        ));
    }
    if r.misrouted > 0 {
        r.warnings.push(format!(
            "{} messages arrived on the wrong channel (the Node baseline has one channel: use \
             --channels 1 against it)",
            r.misrouted
        ));
    }
    if r.dropped > 0 {
        r.warnings
            .push(format!("the server closed {} connections", r.dropped));
    }
    if cfg.observe {
        r.warnings.push(
            "observe mode: messages sent are inferred from the highest sequence number seen; \
             compare with the publishing generator's report"
                .into(),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_interleaves_channels() {
        let s = Schedule {
            start: 1_000,
            end: 1_000 + 1_000_000_000,
            channels: 4,
            rate: 100.0,
        };
        // Message i is due at i × 10 ms; channel 2's second message is message 6.
        assert_eq!(s.at(2, 1), 1_000 + 60_000_000);
        assert_eq!(s.at(0, 0), 1_000);
        assert_eq!(s.total(), 100);
        let idle = Schedule { rate: 0.0, ..s };
        assert_eq!(idle.at(0, 0), u64::MAX);
        assert_eq!(idle.total(), 0);
    }
}
