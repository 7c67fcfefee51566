//! The in-process broker: one thread that routes every publish to the loops with members on
//! its channel. With it, one wsrelay process is a complete server with nothing else running.
//! It owns the routing table; loops reach it only through the bridge queues.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::select;

use super::{Confirmations, RateLimit, Routes, fan_out};
use crate::bridge::{BrokerInbox, Control, Delivery, LoopHandle, Publish};
use crate::metrics::{Metrics, inc};

/// How often pending confirmations are retried while some wait.
const RETRY: Duration = Duration::from_millis(5);

/// Starts the broker thread. It exits when every loop has dropped its broker handle.
pub fn spawn(inbox: BrokerInbox, loops: Vec<LoopHandle>, metrics: Arc<Metrics>) -> JoinHandle<()> {
    metrics.broker.subscriber_up.store(true, Ordering::Relaxed);
    std::thread::Builder::new()
        .name("wsrelay-broker".into())
        .spawn(move || MemoryBroker::new(loops, metrics).run(inbox))
        .expect("spawn broker thread")
}

struct MemoryBroker {
    loops: Vec<LoopHandle>,
    metrics: Arc<Metrics>,
    routes: Routes,
    confirmations: Confirmations,
    drop_log: RateLimit,
}

impl MemoryBroker {
    fn new(loops: Vec<LoopHandle>, metrics: Arc<Metrics>) -> Self {
        MemoryBroker {
            loops,
            metrics,
            routes: Routes::default(),
            confirmations: Confirmations::default(),
            drop_log: RateLimit::default(),
        }
    }

    fn run(mut self, inbox: BrokerInbox) {
        loop {
            let timeout = if self.confirmations.is_empty() {
                Duration::from_secs(3600)
            } else {
                RETRY
            };
            select! {
                recv(inbox.control) -> c => match c {
                    Ok(c) => self.control(c),
                    Err(_) => return,
                },
                recv(inbox.publish) -> p => match p {
                    Ok(p) => self.publish(p),
                    Err(_) => return,
                },
                default(timeout) => {}
            }
            self.confirmations.retry(&self.loops);
        }
    }

    fn control(&mut self, c: Control) {
        match c {
            Control::Subscribe {
                channel,
                loop_id,
                generation,
            } => {
                self.routes.add(&channel, loop_id);
                // In-process, a route is live as soon as it is in the table.
                self.confirmations
                    .confirm(&self.loops, loop_id, channel, generation);
            }
            Control::Unsubscribe { channel, loop_id } => {
                self.routes.remove(&channel, loop_id);
            }
        }
        self.metrics
            .broker
            .channels
            .store(self.routes.len() as u64, Ordering::Relaxed);
    }

    fn publish(&mut self, p: Publish) {
        inc(&self.metrics.broker.published);
        let targets = self.routes.loops(&p.channel);
        if targets.is_empty() {
            return;
        }
        let d = Delivery::new(p.channel, p.kind, p.data, None);
        fan_out(&self.loops, targets, &d, &self.metrics, &mut self.drop_log);
    }
}
