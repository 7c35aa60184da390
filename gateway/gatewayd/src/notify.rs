//! systemd service notifications (`sd_notify(3)`) for `Type=notify` units.
//!
//! `gatewayd run` tells the service manager `READY=1` once every listener is bound,
//! `WATCHDOG=1` periodically while the runtime is alive (when the unit sets `WatchdogSec=`),
//! and `STOPPING=1` when it starts draining. The messages are datagrams to the socket named
//! by `$NOTIFY_SOCKET`: a path, or an abstract socket name when it starts with `@`.
//!
//! Without `$NOTIFY_SOCKET` (a shell, the tests, another init system) every call is a no-op.
//! A failure to notify is logged and never stops the gateway: the service manager then
//! judges it by its own timeouts.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where notifications go: the socket named by `$NOTIFY_SOCKET`, if any.
#[derive(Debug, Clone)]
pub struct Notifier {
    target: Option<String>,
}

impl Notifier {
    /// The notifier of this process's environment (`$NOTIFY_SOCKET`).
    pub fn from_env() -> Self {
        Self::to(std::env::var("NOTIFY_SOCKET").ok())
    }

    /// A notifier writing to `target` (a path or `@abstract`), or a no-op for None / "".
    pub fn to(target: Option<String>) -> Self {
        Self {
            target: target.filter(|t| !t.is_empty()),
        }
    }

    /// Is there a service manager to tell?
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one notification (newline-separated `KEY=VALUE` assignments).
    /// `Ok(false)` when no socket is configured.
    pub fn notify(&self, state: &str) -> io::Result<bool> {
        let Some(target) = &self.target else {
            return Ok(false);
        };
        let addr = socket_addr(target)?;
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
        Ok(true)
    }

    /// Sends `state`, logging (not returning) a failure.
    pub fn notify_logged(&self, state: &str) {
        if let Err(e) = self.notify(state) {
            tracing::warn!(error = %e, state, "cannot notify the service manager");
        }
    }
}

/// The socket address of a `$NOTIFY_SOCKET` value: `@name` is Linux's abstract namespace.
fn socket_addr(target: &str) -> io::Result<SocketAddr> {
    match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        }
        None => SocketAddr::from_pathname(target),
    }
}

/// How often to send `WATCHDOG=1`: half the unit's `WatchdogSec=` (from `$WATCHDOG_USEC`),
/// if the watchdog is meant for this process (`$WATCHDOG_PID` absent or ours).
pub fn watchdog_interval() -> Option<Duration> {
    interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn interval_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if pid.is_some_and(|pid| pid.trim().parse::<u32>().ok() != Some(own_pid)) {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

/// Sends `WATCHDOG=1` every `interval` until `shutdown` turns true.
pub async fn run_watchdog(
    notifier: Notifier,
    interval: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => notifier.notify_logged("WATCHDOG=1"),
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_notify_socket_nothing_is_sent() {
        assert!(!Notifier::to(None).notify("READY=1").unwrap());
        assert!(!Notifier::to(Some(String::new())).notify("READY=1").unwrap());
    }

    #[test]
    fn notification_reaches_a_path_socket_as_one_datagram() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::to(Some(path.to_string_lossy().into_owned()));
        assert!(n.notify("READY=1\nSTATUS=serving").unwrap());
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
    }

    #[test]
    fn notification_reaches_an_abstract_socket_named_with_at() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("gatewayd-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::to(Some(format!("@{name}")));
        assert!(n.notify("WATCHDOG=1").unwrap());
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let n = Notifier::to(Some("/nonexistent/gatewayd/notify".into()));
        assert!(n.notify("READY=1").is_err());
    }

    #[test]
    fn watchdog_interval_is_half_of_watchdog_usec_for_this_process() {
        assert_eq!(
            interval_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            interval_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(interval_from(None, None, 7), None);
        assert_eq!(interval_from(Some("0"), None, 7), None);
        assert_eq!(interval_from(Some("soon"), None, 7), None);
    }
}
