//! ApacheBench (`ab`), run for real.

use std::process::Command;

/// What `ab` reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AbReport {
    pub complete: u64,
    pub failed: u64,
    pub non_2xx: u64,
    pub requests_per_sec: f64,
}

/// Runs `ab` with `args` against `url` and parses its report.
pub fn ab(args: &[&str], url: &str) -> AbReport {
    let output = Command::new("ab")
        .args(args)
        .arg(url)
        .output()
        .unwrap_or_else(|err| {
            panic!("cannot run ab ({err}): install it with `apt-get install -y apache2-utils`")
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "ab failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let field = |name: &str| -> Option<f64> {
        stdout.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?;
            rest.split_whitespace().next()?.parse().ok()
        })
    };
    AbReport {
        complete: field("Complete requests:").expect("ab reports complete requests") as u64,
        failed: field("Failed requests:").expect("ab reports failed requests") as u64,
        // ab prints this line only when some responses were not 2xx.
        non_2xx: field("Non-2xx responses:").unwrap_or(0.0) as u64,
        requests_per_sec: field("Requests per second:").unwrap_or(0.0),
    }
}
