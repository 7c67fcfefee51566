//! Where a message sits in its channel's history. A plain value every layer shares (the
//! brokers assign it, the protocol carries it, the loops compare it), so it depends on nothing.

use std::sync::Arc;

/// Where a message sits in its channel's history: a gapless per-channel offset, and the epoch
/// that names the history those offsets belong to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// 1-based, gapless, increasing per channel.
    pub offset: u64,
    /// Changes whenever the channel's history is lost and restarted.
    pub epoch: Arc<str>,
}

/// A fresh, random epoch name. Not a secret: it only has to differ from the previous one.
pub fn new_epoch() -> Arc<str> {
    let s: String = std::iter::repeat_with(fastrand::alphanumeric).take(10).collect();
    Arc::from(s)
}
