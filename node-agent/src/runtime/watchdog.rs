//! The hardware watchdog behind the engine's `ArmWatchdog` / `DisarmWatchdog`.
//!
//! One device serves every group of the node: it is kept alive while some group's armed
//! deadline is ahead, and left to fire once the earliest one is near — so a serving agent
//! that stalls (and cannot take its virtual IP down) gets the machine reset instead of
//! serving on beside the peer that took over. When no group is armed any more the device
//! is closed with the magic character, which stops it.
//!
//! The Linux watchdog API counts whole seconds: the device is set to [`TIMEOUT_SECS`] and
//! petted every [`PET_EVERY`] while `now + PET_EVERY` is before the deadline, so the reset
//! comes at most `TIMEOUT_SECS − PET_EVERY` after the deadline. That slack (and running
//! without a device at all) is reported once as a risk.
//!
//! Exiting while armed closes the device without the magic character: the kernel keeps
//! counting, and only an agent that comes back in time (and resumes under its lease)
//! stops the reset.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::engine::Instant;

/// Requested device timeout.
pub const TIMEOUT_SECS: i32 = 1;
/// How often the device is petted while armed.
pub const PET_EVERY: Duration = Duration::from_millis(100);

nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, libc::c_int);

/// What the feeder does at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Some deadline is comfortably ahead: keep the machine alive.
    Pet,
    /// The earliest deadline is (nearly) here: stop petting, let the device fire.
    LetFire,
    /// Nothing is armed.
    Idle,
}

/// Pure: petting at `now` must not keep the machine alive past any armed deadline by more
/// than the device's granularity.
pub fn decide(now: Instant, deadlines: impl IntoIterator<Item = Instant>) -> Decision {
    match deadlines.into_iter().min() {
        None => Decision::Idle,
        Some(earliest) if now + PET_EVERY < earliest => Decision::Pet,
        Some(_) => Decision::LetFire,
    }
}

#[derive(Debug, Default)]
struct State {
    armed: BTreeMap<String, Instant>,
    file: Option<File>,
    risk_noted: bool,
}

/// The node's watchdog (or its absence).
#[derive(Debug)]
pub struct Watchdog {
    device: Option<PathBuf>,
    state: Mutex<State>,
}

impl Watchdog {
    pub fn new(device: Option<PathBuf>) -> Arc<Watchdog> {
        Arc::new(Watchdog { device, state: Mutex::new(State::default()) })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Group `group` must see the machine reset by `deadline` unless re-armed or disarmed.
    /// Returns a risk to report (once per agent run): no device, or a coarse one.
    pub fn arm(&self, group: &str, deadline: Instant, now: Instant) -> Option<String> {
        let mut state = self.state();
        state.armed.insert(group.to_string(), deadline);
        let Some(device) = &self.device else {
            return (!std::mem::replace(&mut state.risk_noted, true)).then(|| {
                "no watchdog device configured (agent.yaml watchdog.device): a primary whose agent stalls is not reset at its lease's end".to_string()
            });
        };
        let mut risk = None;
        if state.file.is_none() {
            match open(device) {
                Ok((file, timeout)) => {
                    state.file = Some(file);
                    if !std::mem::replace(&mut state.risk_noted, true) {
                        risk = Some(format!(
                            "watchdog {} armed with a {timeout} s timeout: a stalled primary is reset up to {} ms after its lease's end",
                            device.display(),
                            (Duration::from_secs(u64::try_from(timeout).unwrap_or(1)).saturating_sub(PET_EVERY))
                                .as_millis()
                        ));
                    }
                }
                Err(e) => {
                    return Some(format!(
                        "watchdog {}: {e}; a primary whose agent stalls is not reset",
                        device.display()
                    ));
                }
            }
        }
        feed(&mut state, now);
        risk
    }

    /// Group `group` no longer needs the reset.
    pub fn disarm(&self, group: &str) {
        let mut state = self.state();
        state.armed.remove(group);
        if state.armed.is_empty() {
            match (state.file.take(), &self.device) {
                (Some(file), _) => magic_close(file),
                // A previous run may have left the device counting: open it to stop it.
                (None, Some(device)) => {
                    if let Ok((file, _)) = open(device) {
                        magic_close(file);
                    }
                }
                (None, None) => {}
            }
        }
    }

    /// One feeder round at `now`.
    pub fn tick(&self, now: Instant) {
        let mut state = self.state();
        feed(&mut state, now);
    }

    /// Pets (or stops petting) every [`PET_EVERY`] until the returned task is dropped.
    pub fn spawn_feeder(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(PET_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                me.tick(super::clock::now());
            }
        })
    }
}

fn feed(state: &mut State, now: Instant) {
    if decide(now, state.armed.values().copied()) == Decision::Pet
        && let Some(file) = &mut state.file
        && let Err(e) = file.write_all(b"\0")
    {
        tracing::warn!(error = %e, "petting the watchdog failed");
    }
}

fn open(device: &std::path::Path) -> std::io::Result<(File, i32)> {
    let file = std::fs::OpenOptions::new().write(true).open(device)?;
    let mut timeout: libc::c_int = TIMEOUT_SECS;
    // SAFETY: WDIOC_SETTIMEOUT reads and writes one int through a valid pointer, on a
    // descriptor this function owns.
    unsafe { wdioc_settimeout(file.as_raw_fd(), &mut timeout) }.map_err(std::io::Error::from)?;
    Ok((file, timeout))
}

fn magic_close(mut file: File) {
    if let Err(e) = file.write_all(b"V") {
        tracing::warn!(error = %e, "closing the watchdog cleanly failed; it may still reset the machine");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Instant {
        Instant::from_millis(n)
    }

    #[test]
    fn pets_only_while_every_deadline_is_ahead() {
        assert_eq!(decide(ms(1000), []), Decision::Idle);
        assert_eq!(decide(ms(1000), [ms(1800)]), Decision::Pet);
        assert_eq!(decide(ms(1000), [ms(1800), ms(1090)]), Decision::LetFire, "the earliest group decides");
        assert_eq!(decide(ms(1000), [ms(1100)]), Decision::LetFire, "a pet now would outlast the deadline");
        assert_eq!(decide(ms(2000), [ms(1800)]), Decision::LetFire);
    }

    #[test]
    fn without_a_device_the_risk_is_reported_once() {
        let w = Watchdog::new(None);
        let first = w.arm("db/pg", ms(5000), ms(1000));
        assert!(first.is_some_and(|r| r.starts_with("no watchdog device configured")));
        assert_eq!(w.arm("db/pg", ms(6000), ms(2000)), None);
        w.disarm("db/pg");
        w.tick(ms(3000));
    }

    #[test]
    fn a_device_that_is_not_a_watchdog_is_reported() {
        // /dev/null accepts the open but not the watchdog ioctl.
        let w = Watchdog::new(Some(PathBuf::from("/dev/null")));
        let risk = w.arm("db/pg", ms(5000), ms(1000)).unwrap_or_default();
        assert!(risk.starts_with("watchdog /dev/null: "), "{risk}");
    }
}
