//! Free loopback ports for processes that need a port in their config (Envoy's
//! listener and admin), each handed out at most once per test process.
//!
//! Why not simply bind `127.0.0.1:0`: the kernel then picks from the ephemeral range,
//! the same range it uses for the source port of every outgoing connection. Between
//! handing a port out and Envoy binding it (about a second), a parallel test's 300
//! concurrent client sockets can take it. So ports come from below the ephemeral range
//! (`/proc/sys/net/ipv4/ip_local_port_range`), where no outgoing connection lands,
//! starting at a per-process random offset so concurrent test binaries rarely probe the
//! same ones; each candidate is checked free by binding it. If that range is too small
//! we fall back to the kernel's choice.
//!
//! Processes that can report their own port (the upstream) should bind port 0
//! themselves instead: that has no race at all.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::sync::{Mutex, OnceLock};

/// Lowest port we hand out from the non-ephemeral range (above most well-known
/// services' defaults, e.g. 8000, 9018, 9901, 6379, 7379 which `make run` uses).
const LOW: u16 = 15000;

struct State {
    handed_out: HashSet<u16>,
    next: u32,
}

fn state() -> &'static Mutex<State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE.get_or_init(|| {
        Mutex::new(State {
            handed_out: HashSet::new(),
            next: seed(),
        })
    })
}

fn seed() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // Mix pid and clock so two test binaries started together begin far apart.
    (std::process::id().wrapping_mul(2_654_435_761)) ^ nanos
}

fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

fn is_free(port: u16) -> bool {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// A loopback TCP port that is free right now and that this process has not handed
/// out before. Panics if none can be found (the machine is out of ports).
pub fn free_port() -> u16 {
    let mut st = state().lock().unwrap_or_else(|e| e.into_inner());
    let high = ephemeral_low();
    if high > LOW + 1000 {
        let span = u32::from(high - LOW);
        for _ in 0..span {
            let port = LOW + (st.next % span) as u16;
            st.next = st.next.wrapping_add(1);
            if !st.handed_out.contains(&port) && is_free(port) {
                st.handed_out.insert(port);
                return port;
            }
        }
    }
    for _ in 0..1000 {
        let port = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port());
        if let Ok(port) = port {
            if st.handed_out.insert(port) {
                return port;
            }
        }
    }
    panic!("no free loopback port left");
}
