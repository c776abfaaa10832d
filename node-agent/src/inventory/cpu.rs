//! CPU and memory from procfs (`/proc/cpuinfo`, `/proc/meminfo`).

use std::collections::HashSet;
use std::io;
use std::path::Path;

use steward_proto::agent::v1::Cpu;

/// Reads and parses `PROC/cpuinfo`.
pub(super) fn read_cpu(proc_root: &Path) -> io::Result<Cpu> {
    let text = std::fs::read_to_string(proc_root.join("cpuinfo"))?;
    Ok(parse_cpuinfo(&text))
}

/// Total and available memory in bytes, as `/proc/meminfo` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Memory {
    pub(super) total_bytes: u64,
    pub(super) available_bytes: u64,
}

/// Reads and parses `PROC/meminfo`.
pub(super) fn read_memory(proc_root: &Path) -> io::Result<Memory> {
    let text = std::fs::read_to_string(proc_root.join("meminfo"))?;
    parse_meminfo(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no MemTotal line"))
}

/// Keys that name the CPU model, best first. x86 has "model name"; many ARM kernels have no
/// model line at all and some have "Hardware" or "Model" instead.
const MODEL_KEYS: [&str; 4] = ["model name", "Model", "Hardware", "cpu model"];

/// Parses the text of `/proc/cpuinfo`.
///
/// Logical cores are the `processor` entries. Physical cores are the distinct
/// (`physical id`, `core id`) pairs; when some entry lacks either (many ARM kernels and some
/// hypervisors), the logical count stands in for it.
pub(super) fn parse_cpuinfo(text: &str) -> Cpu {
    let mut model: Option<(usize, String)> = None;
    let mut logical = 0u32;
    let mut pairs: HashSet<(String, String)> = HashSet::new();
    let mut every_entry_has_topology = true;

    // Entries are separated by blank lines; a few lines (ARM's "Hardware") live in a trailing
    // block without a "processor" key.
    for block in text.split("\n\n") {
        let mut is_processor = false;
        let mut physical_id = None;
        let mut core_id = None;
        for line in block.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let (key, value) = (key.trim(), value.trim());
            match key {
                "processor" => is_processor = true,
                "physical id" => physical_id = Some(value.to_owned()),
                "core id" => core_id = Some(value.to_owned()),
                _ => {}
            }
            if let Some(rank) = MODEL_KEYS.iter().position(|k| *k == key)
                && !value.is_empty()
                && model.as_ref().is_none_or(|(best, _)| rank < *best)
            {
                model = Some((rank, value.to_owned()));
            }
        }
        if !is_processor {
            continue;
        }
        logical += 1;
        match (physical_id, core_id) {
            (Some(p), Some(c)) => {
                pairs.insert((p, c));
            }
            _ => every_entry_has_topology = false,
        }
    }

    let physical = if every_entry_has_topology && !pairs.is_empty() {
        u32::try_from(pairs.len()).unwrap_or(u32::MAX)
    } else {
        logical
    };
    Cpu {
        model: model.map(|(_, m)| m).unwrap_or_default(),
        logical_cores: logical,
        physical_cores: physical,
    }
}

/// Parses the text of `/proc/meminfo` (values in kB). `None` without a `MemTotal` line.
/// Kernels older than 3.14 have no `MemAvailable`; `MemFree` stands in for it there.
pub(super) fn parse_meminfo(text: &str) -> Option<Memory> {
    let mut total = None;
    let mut available = None;
    let mut free = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match key.trim() {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut available,
            "MemFree" => &mut free,
            _ => continue,
        };
        let number = value.trim().trim_end_matches("kB").trim();
        *slot = number.parse::<u64>().ok().map(|kb| kb.saturating_mul(1024));
    }
    Some(Memory {
        total_bytes: total?,
        available_bytes: available.or(free).unwrap_or(0),
    })
}
