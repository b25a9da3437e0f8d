//! Mount points: present in `/proc/self/mountinfo`, and writable (a probe file is created,
//! synced and removed).

use std::io::Write;
use std::path::Path;

use super::Observation;

/// Mount points listed in a mountinfo text, with the kernel's octal escapes undone.
pub fn mount_points(mountinfo: &str) -> Vec<String> {
    mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).map(unescape).collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(octal) = bytes.get(i + 1..i + 4)
            && let Ok(value) = u8::from_str_radix(std::str::from_utf8(octal).unwrap_or("x"), 8)
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks that `path` is a mount point and, when asked, that a file can be written there.
pub fn observe(mountinfo: &Path, path: &str, writable: bool) -> Observation {
    let text = match std::fs::read_to_string(mountinfo) {
        Ok(t) => t,
        Err(e) => return Observation::unhealthy(format!("cannot read {}: {e}", mountinfo.display())),
    };
    let wanted = path.trim_end_matches('/');
    let wanted = if wanted.is_empty() { "/" } else { wanted };
    if !mount_points(&text).iter().any(|m| m == wanted) {
        return Observation::unhealthy(format!("{path} is not mounted"));
    }
    if !writable {
        return Observation::healthy(format!("{path} is mounted"));
    }
    let probe = Path::new(wanted).join(format!(".hapair-probe-{}", std::process::id()));
    let written = std::fs::File::create(&probe).and_then(|mut f| {
        f.write_all(b"hapair mount probe\n")?;
        f.sync_all()
    });
    let removed = std::fs::remove_file(&probe);
    match (written, removed) {
        (Ok(()), Ok(())) => Observation::healthy(format!("{path} is mounted and writable")),
        (Err(e), _) | (Ok(()), Err(e)) => Observation::unhealthy(format!("{path} is mounted but not writable: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_points_are_unescaped() {
        let text = "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    40 22 0:35 / /mnt/with\\040space rw - tmpfs tmpfs rw\nshort line\n";
        assert_eq!(mount_points(text), vec!["/".to_string(), "/mnt/with space".to_string()]);
    }
}
