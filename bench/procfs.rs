//! Readings of a child process from `/proc` (Linux), shared by the benchmark harnesses.

/// A `kB` field of `/proc/PID/status` (VmHWM, VmRSS), in bytes.
pub fn proc_status(pid: u32, field: &str) -> anyhow::Result<u64> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    let kb: u64 = line.split_whitespace().nth(1).context("value")?.parse()?;
    Ok(kb * 1024)
}
