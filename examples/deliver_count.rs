//! A fixed amount of fan-out work, for counting instructions instead of timing them (times on a
//! shared 2-core machine are noise; instruction counts are repeatable): 10,000 plain raw
//! subscribers, 200 deliveries of 64 bytes each. Run it under callgrind, counting only
//! `fanout::deliver`:
//!
//! ```sh
//! cargo build --release --example deliver_count
//! valgrind --tool=callgrind --toggle-collect='wsrelay::fanout::deliver*' \
//!     target/release/examples/deliver_count
//! ```
//!
//! `tuning.md` compares the count across versions (older versions took a `max_output`
//! argument in `fanout::deliver` and had `Turn::slow`).

#[path = "../benches/support/fanout_fixture.rs"]
mod fanout_fixture;

use fanout_fixture::{delivery, fixture, reset};
use wsrelay::fanout::{self, Turn};

fn main() {
    let mut f = fixture(10_000);
    let d = delivery();
    let mut turn = Turn::default();
    let mut total = 0;
    for _ in 0..200 {
        total += fanout::deliver(&d, &f.members, &mut f.conns, &mut turn);
        reset(&mut f, &mut turn);
    }
    println!("{total} deliveries");
}
