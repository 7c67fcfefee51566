//! Giving freed memory back to the operating system. glibc's allocator keeps memory freed in
//! the middle of its heaps (history that expired, buffers of connections that left) as its own
//! free lists: the process's RSS stays at its peak long after the peak has passed. A thread
//! asks it every few seconds to return whole free pages (`malloc_trim`), off the event loops,
//! so a burst's memory comes back when the burst is over. Large blocks (the output buffer of a
//! client that fell behind, a v1 envelope of a large message) are mapped on their own from the
//! start ([`map_large_blocks`]), so they go back the moment they are freed. Other C libraries:
//! nothing to do.

use std::time::{Duration, Instant};

/// How often free memory is returned. Each call walks the allocator's free lists (about a
/// millisecond per hundred megabytes freed); every few seconds is enough to bring RSS down
/// after a burst and costs nothing measurable in between.
pub const EVERY: Duration = Duration::from_secs(5);

/// Blocks of at least this many bytes get their own mapping, returned to the OS when freed.
/// glibc's default starts at 128 KiB but rises to the size of any such block freed (up to
/// 32 MiB), after which multi-megabyte output buffers come from the heaps and stay resident
/// after they are freed: 100 clients that never read, budget 16 MiB × 2 loops
/// (`scripts/rss-probe.py`), peaked at 89-104 MB above the baseline with the moving threshold
/// and 60-64 MB with it fixed here. A block this large costs a `mmap` and a `munmap`, next to
/// the writes of that many bytes it is for.
pub const MAP_THRESHOLD: usize = 128 * 1024;

/// Fixes the allocator's mapping threshold at [`MAP_THRESHOLD`]. Call once at start, before
/// other threads allocate.
pub fn map_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of the allocator; called before other threads run.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MAP_THRESHOLD as libc::c_int);
    }
}

/// Returns free pages of every allocator arena to the OS. True if some were returned.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only takes the allocator's own locks; any thread may call it.
        unsafe { libc::malloc_trim(0) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Starts the thread; it ends once `stop` says so (asked at least every second).
pub fn spawn(stop: impl Fn() -> bool + Send + 'static) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("wsrelay-trim".into())
        .spawn(move || {
            let mut next = Instant::now() + EVERY;
            while !stop() {
                std::thread::sleep(
                    Duration::from_secs(1).min(next.saturating_duration_since(Instant::now())),
                );
                if Instant::now() >= next {
                    trim();
                    next = Instant::now() + EVERY;
                }
            }
        })
}
