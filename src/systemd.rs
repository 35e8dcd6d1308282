//! The systemd layer: socket activation (`sd_listen_fds_with_names(3)`), readiness and status
//! notification (`sd_notify(3)`), and the watchdog interval. Everything here also works, and does
//! nothing harmful, when the process was not started by systemd.
//!
//! [`take_inherited_sockets`] and [`take_watchdog`] unset their environment variables (so that they do
//! not leak into children), which is only sound while the process has a single thread: call them first
//! thing in `main`, before the async runtime starts.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

pub use sd_notify::NotifyState;

/// A socket passed by the service manager, with its `FileDescriptorName=`.
#[derive(Debug)]
pub struct InheritedSocket {
    pub name: String,
    pub fd: OwnedFd,
}

/// Adopts the sockets passed with `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` (marking them close-on-exec).
///
/// # Safety
/// Must be called while the process has only one thread.
pub unsafe fn take_inherited_sockets() -> io::Result<Vec<InheritedSocket>> {
    // SAFETY: the caller guarantees that no other thread reads or writes the environment.
    let fds = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }?;
    Ok(fds
        .map(|(fd, name)| InheritedSocket {
            name,
            // SAFETY: systemd passed us ownership of this descriptor, and nothing else refers to it.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
        .collect())
}

/// The interval at which systemd expects `WATCHDOG=1`, if it asked for any.
///
/// # Safety
/// Must be called while the process has only one thread.
pub unsafe fn take_watchdog() -> Option<Duration> {
    // SAFETY: as above.
    unsafe { sd_notify::watchdog_enabled_and_unset_env() }
}

/// Best effort: without `NOTIFY_SOCKET` this does nothing; a failure is logged, never fatal.
pub fn notify(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// `RELOADING=1` with the `MONOTONIC_USEC=` that `Type=notify-reload` requires (systemd ≥ 253).
pub fn notify_reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}
