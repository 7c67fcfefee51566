//! What a `wsrelay.v1` subscriber received under faults, and the gaps it was told of: the
//! checks of `tests/faults.rs` (one Redis) and `tests/cluster_failover.rs` (a Redis Cluster).

use std::time::Duration;

use serde_json::Value;
use wsrelay_client::V1;

use crate::Node;

/// Collects every frame a v1 subscriber of `channel` on `node` receives until it sees the
/// message `end`, starting with the reply to its subscribe (which names the position it
/// starts from).
pub fn subscriber(node: &Node, channel: &str) -> std::thread::JoinHandle<Vec<Value>> {
    let mut c = V1::connect(node.addr, None).unwrap();
    let reply = c.subscribe(channel, None).unwrap();
    assert_eq!(reply["type"], "subscribed");
    std::thread::spawn(move || {
        let mut got = vec![reply];
        loop {
            let v = c.next(Duration::from_secs(60)).expect("subscriber stalled");
            let end = v["type"] == "message" && v["data"] == "end";
            got.push(v);
            if end {
                return got;
            }
        }
    })
}

/// A position in a channel: (epoch, offset).
pub type Position = (String, u64);

/// The position a frame names, if it names one.
pub fn position(v: &Value) -> Option<Position> {
    Some((v["epoch"].as_str()?.to_owned(), v["offset"].as_u64()?))
}

/// Messages a subscriber was told it may have missed: those after `after`, up to and
/// including `upto` (the two may be in different epochs).
#[derive(Debug)]
pub struct Gap {
    /// The last position before the gap.
    pub after: Position,
    /// The last position the gap covers.
    pub upto: Position,
}

impl Gap {
    /// Whether the message at this position lies in the gap.
    pub fn excuses(&self, (epoch, offset): &Position) -> bool {
        let (after, upto) = (&self.after, &self.upto);
        let past_after = *epoch != after.0 || *offset > after.1;
        let before_upto = *epoch != upto.0 || *offset <= upto.1;
        (*epoch == after.0 || *epoch == upto.0) && past_after && before_upto
    }
}

/// The gaps a subscriber's `recovered: false` notices excuse, each from the position the
/// subscriber had before the notice to the position the notice names (or, when it names
/// none, to just before the next message). `got` starts with the subscribe reply.
pub fn gaps(name: &str, got: &[Value]) -> Vec<Gap> {
    let mut last = position(&got[0]).unwrap_or_else(|| panic!("{name}: subscribed without a position"));
    let mut gaps = Vec::new();
    let mut open: Option<Position> = None;
    for m in &got[1..] {
        let here = position(m);
        if m["type"] == "message" {
            let Some(here) = here else { continue };
            if let Some(after) = open.take() {
                gaps.push(Gap {
                    after,
                    upto: (here.0.clone(), here.1.saturating_sub(1)),
                });
            }
            last = here;
        } else if m["type"] == "subscribed" && m["recovered"] == false {
            match here {
                Some(upto) => {
                    gaps.push(Gap {
                        after: open.take().unwrap_or_else(|| last.clone()),
                        upto: upto.clone(),
                    });
                    last = upto;
                }
                None => open = Some(open.take().unwrap_or_else(|| last.clone())),
            }
        }
    }
    gaps
}
