//! The benchmark's table: one row per implementation with p50, p99, max, kills, failures,
//! the time both servers held the VIP at once and, for a service that writes, the
//! acknowledged writes lost, then the mean and p99 of each phase
//! where the implementation records them, the parameters of each and anything that kept a
//! row from being measured.

use std::fmt::Write;
use std::time::Duration;

use super::Measured;
use super::stats::Samples;

#[derive(Debug)]
pub struct Row {
    pub label: String,
    pub parameters: String,
    pub result: Measured,
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// Renders the rows as a fixed-width table followed by the notes.
pub fn render(rows: &[Row]) -> String {
    let width = rows.iter().map(|r| r.label.len()).max().unwrap_or(0).max("implementation".len());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$}  {:>9}  {:>9}  {:>9}  {:>4}  {:>8}  {:>10}  {:>11}",
        "implementation", "p50 ms", "p99 ms", "max ms", "N", "failures", "overlap ms", "lost writes"
    );
    let mut notes = Vec::new();
    for row in rows {
        let m = &row.result;
        let (p50, p99, max) = match m.samples.summary() {
            Some(s) => (ms(s.p50), ms(s.p99), ms(s.max)),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let overlap = m.overlap.map_or_else(|| "-".to_string(), |o| ms(o.both));
        let lost = m.lost_writes.map_or_else(|| "-".to_string(), |n| n.to_string());
        let _ = writeln!(
            out,
            "{:<width$}  {p50:>9}  {p99:>9}  {max:>9}  {:>4}  {:>8}  {overlap:>10}  {lost:>11}",
            row.label,
            m.samples.kills(),
            m.samples.failures
        );
        if let Some(error) = &m.error {
            notes.push(format!("{}: stopped early: {error}", row.label));
        }
    }
    for row in rows.iter().filter(|r| !r.result.phases.is_empty()) {
        let _ = writeln!(
            out,
            "\nphases of {} (when each ended, from the last heartbeat heard from the old primary):",
            row.label
        );
        let phase_width = row.result.phases.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
        let _ = writeln!(out, "  {:<phase_width$}  {:>9}  {:>9}  {:>4}", "phase", "mean ms", "p99 ms", "N");
        for (phase, times) in &row.result.phases {
            let summary = Samples { times: times.clone(), failures: 0 };
            let (mean, p99) = match (summary.mean(), summary.summary()) {
                (Some(mean), Some(s)) => (ms(mean), ms(s.p99)),
                _ => ("-".into(), "-".into()),
            };
            let _ = writeln!(out, "  {phase:<phase_width$}  {mean:>9}  {p99:>9}  {:>4}", times.len());
        }
    }
    let _ = writeln!(out, "\nparameters:");
    for row in rows {
        let _ = writeln!(out, "  {:<width$}  {}", row.label, row.parameters);
    }
    if !notes.is_empty() {
        let _ = writeln!(out, "\nnotes:");
        for note in notes {
            let _ = writeln!(out, "  {note}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measured_and_stopped_rows_side_by_side() {
        let rows = [
            Row {
                label: "hapair default".into(),
                parameters: "heartbeat 100ms".into(),
                result: Measured {
                    samples: Samples::default(),
                    error: Some("the pair settling timed out".into()),
                    ..Measured::default()
                },
            },
            Row {
                label: "keepalived advert_int 1s".into(),
                parameters: "advert_int 1s".into(),
                result: Measured {
                    samples: Samples {
                        times: vec![Duration::from_millis(3600), Duration::from_micros(3_700_200)],
                        failures: 1,
                    },
                    phases: vec![("serving".into(), vec![Duration::from_millis(1000), Duration::from_millis(1100)])],
                    overlap: Some(super::super::overlap::Overlap::default()),
                    lost_writes: Some(0),
                    error: None,
                },
            },
        ];
        let text = render(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1],
            "hapair default                    -          -          -     0         0           -            -"
        );
        assert_eq!(
            lines[2],
            "keepalived advert_int 1s     3600.0     3700.2     3700.2     3         1         0.0            0"
        );
        assert!(text.contains("\n  serving     1050.0     1100.0     2\n"), "{text}");
        assert!(text.contains("  hapair default: stopped early: the pair settling timed out"), "{text}");
        assert!(text.contains("  keepalived advert_int 1s  advert_int 1s"), "{text}");
    }
}
