//! Giving freed memory back to the operating system. glibc's allocator keeps memory freed in
//! the middle of its heaps (history that expired, buffers of connections that left) as its own
//! free lists: the process's RSS stays at its peak long after the peak has passed. A thread
//! asks it every few seconds to return whole free pages (`malloc_trim`), off the event loops,
//! so a burst's memory comes back when the burst is over. Other C libraries: nothing to do.

use std::time::{Duration, Instant};

/// How often free memory is returned. Each call walks the allocator's free lists (about a
/// millisecond per hundred megabytes freed); every few seconds is enough to bring RSS down
/// after a burst and costs nothing measurable in between.
pub const EVERY: Duration = Duration::from_secs(5);

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
