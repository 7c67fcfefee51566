//! Micro-benchmarks of the per-message hot path, `wsrelay::fanout::deliver`: one 64-byte
//! message appended to the output buffers of 1, 100 and 10,000 open connections, reported per
//! delivery (criterion `Throughput::Elements`: "elem/s" is deliveries per second; time divided
//! by the connection count is ns per delivery). No syscall happens in `deliver`; the flush
//! that follows in the real loop is measured apart:
//!
//! - `flush_buffers`: the end-of-turn walk over the dirty connections, writing into a sink, so
//!   the cost of the buffer bookkeeping (and the release of each buffer) without the kernel;
//! - `flush_syscall`: one real loopback `write` of 1 and of 16 coalesced frames, which is why
//!   the loop flushes each connection once per turn rather than once per message.
//!
//! Connections need a real mio socket: one loopback TCP pair is made and its std stream is
//! `try_clone`d (dup'd) once per connection; those descriptors are never written. 10,000
//! connections need 10,000 descriptors; the soft open-file limit is raised to the hard one.
//!
//! Run: `cargo bench --bench fanout` (add `-- --quick` for a fast pass).

#[path = "support/fanout_fixture.rs"]
mod fanout_fixture;

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

use fanout_fixture::{delivery, fixture, reset};
use wsrelay::fanout::{self, Turn};

const SIZES: [usize; 3] = [1, 100, 10_000];

fn deliver(c: &mut Criterion) {
    let d = delivery();
    let mut g = c.benchmark_group("deliver_64B");
    for n in SIZES {
        let mut f = fixture(n);
        let mut turn = Turn::default();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let got = fanout::deliver(&d, &f.members, &mut f.conns, &mut turn);
                    total += t.elapsed();
                    black_box(got);
                    // Emptying the buffers is not part of a delivery: it is timed apart below.
                    reset(&mut f, &mut turn);
                }
                total
            });
        });
    }
    g.finish();
}

fn flush_buffers(c: &mut Criterion) {
    let d = delivery();
    let mut g = c.benchmark_group("flush_buffers_64B");
    for n in SIZES {
        let mut f = fixture(n);
        let mut turn = Turn::default();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                for _ in 0..iters {
                    fanout::deliver(&d, &f.members, &mut f.conns, &mut turn);
                    let t = Instant::now();
                    for key in turn.dirty.drain(..) {
                        let conn = &mut f.conns[key];
                        conn.dirty = false;
                        black_box(conn.out.write_to(&mut std::io::sink()).unwrap());
                    }
                    total += t.elapsed();
                    turn.gaps.clear();
                }
                total
            });
        });
    }
    g.finish();
}

fn flush_syscall(c: &mut Criterion) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut writer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    writer.set_nodelay(true).unwrap();
    let (mut reader, _) = listener.accept().unwrap();
    // Drain the other end so writes never block.
    std::thread::spawn(move || {
        let mut buf = vec![0; 1 << 16];
        while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    });
    let frame = delivery().raw_frame.clone();
    let mut g = c.benchmark_group("flush_syscall_64B");
    for frames in [1usize, 16] {
        let bytes: Vec<u8> = frame.repeat(frames);
        g.throughput(Throughput::Elements(frames as u64));
        g.bench_with_input(
            BenchmarkId::new("frames_per_write", frames),
            &bytes,
            |b, bytes| b.iter(|| writer.write_all(black_box(bytes)).unwrap()),
        );
    }
    g.finish();
}

criterion_group!(benches, deliver, flush_buffers, flush_syscall);
criterion_main!(benches);
