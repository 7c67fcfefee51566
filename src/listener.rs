//! The accept side of the process: one SO_REUSEPORT listener per loop, all on one address, and
//! the open-file limit that decides how many sockets those listeners can hand out.
//!
//! mio's `TcpListener::bind` does not set SO_REUSEPORT, so listeners are built with socket2 and
//! then handed to mio. With port 0 the first bind picks a port and the rest bind that same port,
//! so "N loops on one address" holds for ephemeral ports too. Other processes may bind the same
//! port (SO_REUSEPORT across processes); the kernel spreads new connections over all of them.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Backlog of pending connections per listener. The kernel caps it at `net.core.somaxconn`
/// (4096 on current kernels); bursts of reconnecting clients need a deep queue.
const BACKLOG: i32 = 4096;

/// Binds `n` nonblocking listeners on `addr` with SO_REUSEPORT. Returns them and the address
/// actually bound (the port chosen when `addr` has port 0).
pub fn bind_all(addr: SocketAddr, n: usize) -> io::Result<(Vec<mio::net::TcpListener>, SocketAddr)> {
    let first = bind_one(addr)?;
    let bound = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..n {
        all.push(bind_one(bound)?);
    }
    Ok((all, bound))
}

fn bind_one(addr: SocketAddr) -> io::Result<mio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}

/// Raises the soft open-file limit to the hard limit and returns the new soft limit. Each
/// connection is one descriptor, so this is the process's real connection ceiling.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(lim.rlim_cur)
}

/// True for accept errors that mean "out of descriptors or memory": retrying at once would spin
/// a core, so the loop stops accepting for a while instead.
pub fn is_resource_exhausted(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_gives_every_listener_the_same_port() {
        let (ls, addr) = bind_all("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_ne!(addr.port(), 0);
        for l in &ls {
            assert_eq!(l.local_addr().unwrap(), addr);
        }
        // A second, independent bind of the same port also succeeds (another process would too).
        let (_more, again) = bind_all(addr, 1).unwrap();
        assert_eq!(again, addr);
    }

    #[test]
    fn fd_limit_is_raised_to_hard() {
        let soft = raise_fd_limit().unwrap();
        assert!(soft >= 1024);
    }
}
