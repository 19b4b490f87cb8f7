//! Drives `wrk` (Debian's package) and reads its report.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// What one wrk run measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Measured {
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Responses other than 2xx/3xx (the 429s of the flood setups).
    pub non_2xx: u64,
    pub socket_errors: u64,
}

pub struct Load<'a> {
    pub url: &'a str,
    pub connections: u32,
    pub duration: Duration,
    /// A wrk Lua script (e.g. one that varies the key), if any.
    pub script: Option<&'a Path>,
}

pub fn run(load: &Load<'_>) -> Result<Measured, String> {
    let mut command = Command::new("wrk");
    command
        .args(["-t1", &format!("-c{}", load.connections)])
        .arg(format!("-d{}s", load.duration.as_secs().max(1)))
        .arg("--latency");
    if let Some(script) = load.script {
        command.arg("-s").arg(script);
    }
    command.arg(load.url);
    let out = command
        .output()
        .map_err(|e| format!("cannot run wrk ({e}): run `make bench`, which installs it"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse(&text).ok_or_else(|| format!("cannot read wrk's report:\n{text}"))
}

/// Reads wrk's `--latency` report.
pub fn parse(report: &str) -> Option<Measured> {
    let mut m = Measured::default();
    for line in report.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", value] => m.p50_ms = millis(value)?,
            ["99%", value] => m.p99_ms = millis(value)?,
            [count, "requests", "in", took, ..] => {
                m.requests = count.parse().ok()?;
                m.seconds = seconds(took.trim_end_matches(','))?;
            }
            ["Requests/sec:", value] => m.rps = value.parse().ok()?,
            ["Non-2xx", "or", "3xx", "responses:", value] => m.non_2xx = value.parse().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                m.socket_errors = rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            _ => {}
        }
    }
    (m.requests > 0 && m.rps > 0.0).then_some(m)
}

fn millis(value: &str) -> Option<f64> {
    let split = value.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        "m" => number * 60_000.0,
        _ => return None,
    })
}

fn seconds(value: &str) -> Option<f64> {
    millis(value).map(|ms| ms / 1000.0)
}

/// A wrk script that cycles through `keys` distinct API keys.
pub fn many_keys_script(keys: usize) -> String {
    format!(
        "local i = 0\n\
         request = function()\n  \
           i = (i + 1) % {keys}\n  \
           return wrk.format(\"GET\", \"/?api_key=key-\" .. i)\n\
         end\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_wrk_report() {
        let report = "Running 5s test @ http://127.0.0.1:1/?api_key=x
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.27ms  303.40us   7.89ms   91.00%
    Req/Sec    25.30k     1.10k   27.00k    80.00%
  Latency Distribution
     50%    1.21ms
     75%    1.33ms
     90%    1.51ms
     99%    2.44ms
  125875 requests in 5.00s, 17.29MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 125874
Requests/sec:  25163.08
Transfer/sec:      3.46MB
";
        let m = parse(report).unwrap();
        assert_eq!(m.requests, 125_875);
        assert!((m.seconds - 5.0).abs() < 1e-9);
        assert!((m.rps - 25_163.08).abs() < 1e-9);
        assert!((m.p50_ms - 1.21).abs() < 1e-9);
        assert!((m.p99_ms - 2.44).abs() < 1e-9);
        assert_eq!(m.non_2xx, 125_874);
        assert_eq!(m.socket_errors, 3);
        assert!((millis("850.00us").unwrap() - 0.85).abs() < 1e-9);
        assert!(parse("garbage").is_none());
    }
}
