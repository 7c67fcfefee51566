//! What the load generator asks the OS: CPU time (its own, per thread, and a server's from
//! `/proc`), a server's resident memory, the open-file limit, and nonblocking connects from a
//! chosen 127.0.0.x source address.
//!
//! Linux only, like the server: `/proc/PID/stat` and `IP_BIND_ADDRESS_NO_PORT` have no
//! portable equivalent worth the trouble here.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: getrusage fills the zeroed struct we pass; RUSAGE_SELF/THREAD always exist.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time (user + system) of this whole process so far.
pub fn process_cpu() -> Duration {
    rusage(libc::RUSAGE_SELF)
}

/// CPU time (user + system) of the calling thread so far.
pub fn thread_cpu() -> Duration {
    rusage(libc::RUSAGE_THREAD)
}

/// CPU time (user + system, all threads) process `pid` has used, from `/proc/PID/stat`.
/// Resolution is the kernel's clock tick (10 ms at the usual 100 Hz).
pub fn proc_cpu(pid: u32) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_cpu(&stat, clock_ticks())
        .ok_or_else(|| io::Error::other(format!("cannot parse /proc/{pid}/stat")))
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// utime + stime from a `/proc/PID/stat` line. The command name may contain spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_stat_cpu(stat: &str, ticks_per_sec: u64) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 of the man page (state) is fields[0]; utime is 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = utime + stime;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / ticks_per_sec))
}

/// Resident memory of process `pid` in bytes (`VmRSS` of `/proc/PID/status`).
pub fn proc_rss(pid: u32) -> io::Result<u64> {
    proc_status(pid, "VmRSS")
}

/// A memory field of `/proc/PID/status` (`VmRSS`, `VmHWM` for the peak, ...), in bytes.
pub fn proc_status(pid: u32, field: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status_field(&status, field)
        .ok_or_else(|| io::Error::other(format!("no {field} in /proc/{pid}/status")))
}

/// `field` of a `/proc/PID/status` text, whose value is in kB, in bytes.
fn parse_status_field(status: &str, field: &str) -> Option<u64> {
    let value = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    let kib: u64 = value.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// Raises the soft open-file limit to the hard one and checks that `connections` sockets fit,
/// keeping `reserve` descriptors for everything else. The error says what to do.
pub fn ensure_fd_room(connections: usize, reserve: usize) -> Result<u64, String> {
    let limit =
        wsrelay::listener::raise_fd_limit().map_err(|e| format!("cannot read the open-file limit: {e}"))?;
    let need = (connections + reserve) as u64;
    if need > limit {
        return Err(format!(
            "{connections} connections need about {need} open files but this process may open \
             {limit} (hard limit): run several generator processes with fewer --connections \
             each (see --observe), or raise the hard limit (ulimit -Hn, /etc/security/limits.conf)"
        ));
    }
    Ok(limit)
}

/// Starts a nonblocking connect to `target`, from `source` if given. With a source address
/// the socket is bound before connecting with `IP_BIND_ADDRESS_NO_PORT`, so the kernel picks
/// the port at connect time per 4-tuple: each 127.0.0.x source then gets its own ~28,000
/// ephemeral ports towards each server port, instead of all connections sharing one range.
pub fn connect(target: SocketAddr, source: Option<IpAddr>) -> io::Result<mio::net::TcpStream> {
    let s = Socket::new(Domain::for_address(target), Type::STREAM, Some(Protocol::TCP))?;
    s.set_nonblocking(true)?;
    // Latency is measured per message: never let Nagle hold a publish back.
    s.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        if ip.is_ipv4() {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt on our own socket with a correctly sized int.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match s.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(mio::net::TcpStream::from_std(s.into()))
}

/// Parses `--source-ips`: a comma-separated list of IPv4 addresses and ranges
/// (`127.0.0.1-127.0.0.20`, or `127.0.0.1-20` for the last octet).
pub fn parse_source_ips(spec: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("--source-ips: {part:?} is not an IPv4 address or a range a-b");
        match part.split_once('-') {
            None => out.push(IpAddr::V4(part.parse().map_err(|_| bad())?)),
            Some((a, b)) => {
                let a: Ipv4Addr = a.parse().map_err(|_| bad())?;
                let b: Ipv4Addr = match b.parse() {
                    Ok(b) => b,
                    Err(_) => {
                        let last: u8 = b.parse().map_err(|_| bad())?;
                        let [x, y, z, _] = a.octets();
                        Ipv4Addr::new(x, y, z, last)
                    }
                };
                let (a, b) = (u32::from(a), u32::from(b));
                if b < a || b - a > 65_535 {
                    return Err(bad());
                }
                out.extend((a..=b).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
            }
        }
    }
    if out.is_empty() {
        return Err("--source-ips: no address given".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_paren() {
        let line = "1234 (my (odd) prog) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0";
        assert_eq!(parse_stat_cpu(line, 100), Some(Duration::from_secs(3)));
    }

    #[test]
    fn rss_from_status() {
        let s = "Name:\tx\nVmPeak:\t 100 kB\nVmRSS:\t    2048 kB\nThreads: 3\n";
        assert_eq!(parse_status_field(s, "VmRSS"), Some(2 * 1024 * 1024));
        assert_eq!(parse_status_field(s, "VmPeak"), Some(100 * 1024));
        assert_eq!(parse_status_field(s, "Vm"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        assert!(proc_rss(pid).unwrap() > 0);
        assert!(proc_status(pid, "VmHWM").unwrap() >= proc_rss(pid).unwrap() / 2);
        proc_cpu(pid).unwrap();
        // Burn a little CPU so the counters move.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(process_cpu() > Duration::ZERO);
        assert!(thread_cpu() > Duration::ZERO);
    }

    #[test]
    fn source_ip_ranges() {
        let ips = parse_source_ips("127.0.0.1-127.0.0.3,127.0.1.9").unwrap();
        assert_eq!(ips.len(), 4);
        assert_eq!(ips[3], "127.0.1.9".parse::<IpAddr>().unwrap());
        assert_eq!(parse_source_ips("127.0.0.1-20").unwrap().len(), 20);
        assert!(parse_source_ips("127.0.0.9-127.0.0.1").is_err());
        assert!(parse_source_ips("localhost").is_err());
    }

    #[test]
    fn too_many_connections_is_a_clear_error() {
        let e = ensure_fd_room(100_000_000, 64).unwrap_err();
        assert!(e.contains("open files"), "{e}");
        ensure_fd_room(10, 64).unwrap();
    }

    #[test]
    fn bind_before_connect_from_another_loopback_address() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let src: IpAddr = "127.0.0.7".parse().unwrap();
        let _c = connect(l.local_addr().unwrap(), Some(src)).unwrap();
        let (_s, peer) = l.accept().unwrap();
        assert_eq!(peer.ip(), src);
    }
}
