//! `--publish-via redis://…`: the publisher as its own thread, sending Redis PUBLISH commands
//! instead of WebSocket frames. The payload is the generator's plain ASCII payload, which
//! wsrelay delivers as it is (only payloads with its own `\0wr1` header are decoded) and the
//! Node baseline forwards as it is.
//!
//! This takes the publishing server's read path out of the measurement and is how a backend
//! publishes in production. Messages due at the same moment go in one pipeline (one round
//! trip), so the thread keeps up with rates far above what one PUBLISH per round trip allows.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::payload::{self, Payload, now_nanos};
use super::run::{Phase, Shared};
use super::worker::PublisherStats;

/// Probe interval during the probe phase.
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// Most messages in one pipeline when behind.
const BATCH: usize = 4096;

/// Connects (so a bad URL fails the run at once) and returns the thread's body.
pub(super) fn start(
    shared: Arc<Shared>,
    url: &str,
) -> Result<impl FnOnce() -> Result<PublisherStats, String> + Send + 'static, String> {
    let client = redis::Client::open(url).map_err(|e| format!("--publish-via {url}: {e}"))?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .map_err(|e| format!("--publish-via {url}: {e}"))?;
    let names: Vec<String> = (0..shared.cfg.channels)
        .map(|c| shared.cfg.redis_channel(c))
        .collect();
    Ok(move || {
        let cfg = &shared.cfg;
        let mut stats = PublisherStats::default();
        let mut buf = Vec::with_capacity(cfg.size);
        let mut next_seq = vec![0u64; cfg.channels];
        // Global message index: message i goes to channel i % K (see `Schedule::at`).
        let mut next_index = 0u64;
        let k = cfg.channels as u64;
        let mut done = false;
        loop {
            match shared.phase() {
                Phase::Connect => std::thread::sleep(Duration::from_millis(5)),
                Phase::Probe => {
                    let mut pipe = redis::pipe();
                    for (c, name) in names.iter().enumerate() {
                        payload::encode(&mut buf, Payload::Probe { channel: c as u32 }, cfg.size);
                        pipe.cmd("PUBLISH").arg(name).arg(&buf[..]).ignore();
                    }
                    pipe.query::<()>(&mut con)
                        .map_err(|e| format!("redis PUBLISH: {e}"))?;
                    std::thread::sleep(PROBE_EVERY);
                }
                Phase::Run if !done && !cfg.observe => {
                    let sched = shared.schedule();
                    let now = now_nanos();
                    let mut pipe = redis::pipe();
                    let mut n = 0;
                    let mut touched = Vec::new();
                    while n < BATCH {
                        let c = (next_index % k) as usize;
                        let at = sched.at(c, next_seq[c]);
                        if at > now || at >= sched.end {
                            break;
                        }
                        let m = Payload::Message {
                            channel: c as u32,
                            seq: next_seq[c],
                            sent: now_nanos(),
                        };
                        payload::encode(&mut buf, m, cfg.size);
                        pipe.cmd("PUBLISH").arg(&names[c]).arg(&buf[..]).ignore();
                        stats.on_send(at, now);
                        next_seq[c] += 1;
                        next_index += 1;
                        touched.push(c);
                        n += 1;
                    }
                    if n > 0 {
                        pipe.query::<()>(&mut con)
                            .map_err(|e| format!("redis PUBLISH: {e}"))?;
                        // Counted as sent only once Redis has them.
                        for c in touched {
                            shared.sent[c].store(next_seq[c], Ordering::Release);
                        }
                    }
                    if now >= sched.end {
                        done = true;
                        shared.publishers_done.fetch_add(1, Ordering::AcqRel);
                        continue;
                    }
                    if n < BATCH {
                        let c = (next_index % k) as usize;
                        let next = sched.at(c, next_seq[c]).min(sched.end);
                        let wait = next.saturating_sub(now_nanos());
                        // Sleep precision is ~60 µs; latency is stamped at send, so this
                        // only shifts the schedule, never the measurement.
                        std::thread::sleep(Duration::from_nanos(wait).min(PROBE_EVERY));
                    }
                }
                Phase::Run | Phase::Drain => std::thread::sleep(Duration::from_millis(5)),
                Phase::Done => return Ok(stats),
            }
        }
    })
}
