//! Process liveness: a process with an exact name, or the pid in a pidfile, alive and not a
//! zombie.

use std::path::Path;

use super::Observation;

/// The kernel keeps at most 15 bytes of a process name in `comm`.
const COMM_LEN: usize = 15;

/// The state letter of `/proc/<pid>/stat` (`R`, `S`, `Z`, …), if the process exists.
fn state(proc: &Path, pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
    // The name may contain spaces and parentheses; the state follows the last ')'.
    stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next())
}

/// Looks for a live process whose `comm` is `name`.
pub fn by_name(proc: &Path, name: &str) -> Observation {
    let wanted: String = name.chars().take(COMM_LEN).collect();
    let Ok(entries) = std::fs::read_dir(proc) else {
        return Observation::unhealthy(format!("cannot read {}", proc.display()));
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end_matches('\n') == wanted && state(proc, pid).is_some_and(|s| s != 'Z' && s != 'X') {
            return Observation::healthy(format!("process {name} is running as pid {pid}"));
        }
    }
    Observation::unhealthy(format!("no running process named {name}"))
}

/// Checks the pid written in `pid_file`.
pub fn by_pid_file(proc: &Path, pid_file: &Path) -> Observation {
    let text = match std::fs::read_to_string(pid_file) {
        Ok(t) => t,
        Err(e) => return Observation::unhealthy(format!("pidfile {}: {e}", pid_file.display())),
    };
    let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()).filter(|p| *p > 0) else {
        return Observation::unhealthy(format!("pidfile {} does not hold a pid", pid_file.display()));
    };
    match state(proc, pid) {
        None => Observation::unhealthy(format!("pid {pid} from {} is not running", pid_file.display())),
        Some('Z') | Some('X') => Observation::unhealthy(format!("pid {pid} from {} is a zombie", pid_file.display())),
        Some(_) => Observation::healthy(format!("pid {pid} from {} is running", pid_file.display())),
    }
}
