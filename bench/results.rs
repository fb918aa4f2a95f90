//! Writing a section of `bench/RESULTS.md`: shared by the benchmark harnesses (`mod results;`).

use std::path::Path;

/// Replaces the section that starts with `heading` (up to the next `## `), keeping the rest of
/// the file; appends it when absent.
pub fn write_section(path: &Path, heading: &str, section: &str) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let section = section.trim_end();
    let new = match old.find(heading) {
        Some(start) => {
            let rest = &old[start + 2..];
            let end = rest.find("\n## ").map_or(old.len(), |i| start + 2 + i + 1);
            format!("{}{section}\n\n{}", &old[..start], &old[end..])
        }
        None if old.trim().is_empty() => format!("# Benchmark results\n\n{section}\n"),
        None => format!("{}\n\n{section}\n", old.trim_end()),
    };
    std::fs::write(path, new.trim_end().to_owned() + "\n")?;
    Ok(())
}
