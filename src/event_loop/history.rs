//! History on demand: the v1 `history` command and `GET /history` read a channel's stored
//! messages without subscribing, through the same broker read as recovery (`Request::History`,
//! one page of `recovery::PAGE_ENTRIES` messages or `recovery::PAGE_BYTES` of payload at most),
//! so a reply is bounded in messages and in bytes whatever the channel holds. A read after a
//! position is settled like a recovery (`recovery::settle`): the same epoch and a history that
//! still starts right after the position, or `recovered: false`.

use std::time::Instant;

use super::EventLoop;
use crate::bridge::{Channel, History, HistoryQuery, Position};
use crate::conn::Pending;
use crate::envelope::{self, Refusal};
use crate::recovery::{self, Settled};

impl EventLoop {
    /// Checks a history read (channel name, the token's grant for an open connection, history
    /// on) and bounds its limit: at most one page and `--history-size`.
    pub(super) fn history_query(
        &mut self,
        key: usize,
        channel: &str,
        limit: Option<u64>,
        since: Option<(u64, String)>,
        reference: Option<Box<str>>,
    ) -> Result<(Channel, HistoryQuery), Refusal> {
        let channel = self.channel_name(channel)?;
        self.may_look(key, &channel)?;
        let size = self.shared.config.history_size;
        if size == 0 {
            return Err(Refusal::new("not_enabled", "history is off (--history-size 0)"));
        }
        let max = size.min(recovery::PAGE_ENTRIES);
        let limit = limit.map_or(max, |l| usize::try_from(l).unwrap_or(usize::MAX).min(max));
        let since = since.map(|(o, e)| (o, e.into()));
        Ok((
            channel,
            HistoryQuery {
                reference,
                limit,
                since,
            },
        ))
    }

    /// The v1 `history` command.
    pub(super) fn history_command(
        &mut self,
        key: usize,
        channel: &str,
        limit: Option<u64>,
        since: Option<(u64, String)>,
        reference: Option<Box<str>>,
    ) {
        let r = reference.clone();
        let sent = self
            .history_query(key, channel, limit, since, reference)
            .and_then(|(channel, query)| self.request_history_query(key, channel, query));
        if let Err(refusal) = sent {
            self.send_error(key, r.as_deref(), &refusal);
        }
    }

    /// The broker's answer to a client's history read: a `history` reply (v1, or the body of
    /// `GET /history`).
    pub(super) fn history_answer(
        &mut self,
        key: usize,
        channel: &str,
        query: HistoryQuery,
        result: Result<History, String>,
        now: Instant,
    ) {
        let r = query.reference.as_deref();
        let h = match result {
            Ok(h) => h,
            Err(e) => {
                let message = format!("history could not be read: {e}");
                if !self.api_reply_json(key, Err(&message), now) {
                    self.send_error(key, r, &Refusal::new("unavailable", message));
                }
                return;
            }
        };
        let top = Position {
            offset: h.top,
            epoch: h.epoch.clone(),
        };
        let (mut messages, mut more, recovered) = match &query.since {
            None => (h.entries.clone(), false, None),
            Some((offset, epoch)) => {
                let asked = Pending {
                    recover: true,
                    announce: true,
                    ..Pending::default()
                };
                match recovery::settle(*offset, Some(epoch), &asked, &h) {
                    Settled::Done {
                        replay,
                        recovered,
                        more,
                        ..
                    } => (replay, more, Some(recovered)),
                    Settled::Restart { .. } => (Vec::new(), false, Some(false)),
                }
            }
        };
        if messages.len() > query.limit {
            messages.truncate(query.limit);
            more |= query.since.is_some();
        }
        let encoded: Vec<String> = messages
            .iter()
            .map(|d| envelope::message(channel, d.position.as_ref(), d.kind, &d.data))
            .collect();
        let json = envelope::history(r, channel, &top, &encoded, more, recovered);
        if !self.api_reply_json(key, Ok(&json), now) {
            self.send_json(key, &json);
        }
    }
}
