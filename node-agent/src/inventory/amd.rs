//! AMD GPUs from sysfs (the amdgpu driver's files under `/sys/class/drm/cardN/device`).

use std::io;
use std::path::{Path, PathBuf};

use steward_proto::agent::v1::{Gpu, GpuVendor};

/// PCI vendor id of AMD/ATI as sysfs prints it.
const AMD_VENDOR: &str = "0x1002";

/// AMD GPUs under `SYS/class/drm`, indexed in card order. A missing `class/drm` (a headless
/// VM, a container without /sys) is no GPU and no note; other failures add a note.
pub(super) fn amd_gpus(sys_root: &Path, notes: &mut Vec<String>) -> Vec<Gpu> {
    let drm = sys_root.join("class/drm");
    let cards = match card_dirs(&drm) {
        Ok(cards) => cards,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            notes.push(format!("amd: cannot list {}: {e}", drm.display()));
            return Vec::new();
        }
    };
    let driver_version = read_trimmed(&sys_root.join("module/amdgpu/version")).unwrap_or_default();

    cards
        .iter()
        .filter(|card| read_trimmed(&card.join("device/vendor")).as_deref() == Some(AMD_VENDOR))
        .zip(0u32..)
        .map(|(card, index)| read_card(card, index, &driver_version))
        .collect()
}

/// The `cardN` entries of a `class/drm` directory, sorted by N. Connectors (`card0-DP-1`),
/// render nodes (`renderD128`, which point at the same PCI device as their card) and the
/// `version` file are skipped.
fn card_dirs(drm: &Path) -> io::Result<Vec<PathBuf>> {
    let mut cards = Vec::new();
    for entry in std::fs::read_dir(drm)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(number) = name.to_str().and_then(|n| n.strip_prefix("card")) else {
            continue;
        };
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(n) = number.parse::<u64>() {
            cards.push((n, entry.path()));
        }
    }
    cards.sort();
    Ok(cards.into_iter().map(|(_, path)| path).collect())
}

/// Reads one AMD card. Every reading is best effort: a file that is missing or unreadable
/// (some, like `gpu_busy_percent`, fail while the GPU is in a low power state) leaves its
/// field empty rather than dropping the GPU.
fn read_card(card: &Path, index: u32, driver_version: &str) -> Gpu {
    let device = card.join("device");
    let name = read_trimmed(&device.join("product_name"))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| {
            let id = read_trimmed(&device.join("device")).unwrap_or_else(|| "unknown".into());
            format!("AMD GPU {id}")
        });
    let hwmon = hwmon_dir(&device);
    let from_hwmon = |file: &str| {
        hwmon
            .as_ref()
            .and_then(|h| read_number::<i64>(&h.join(file)))
    };

    Gpu {
        vendor: GpuVendor::Amd as i32,
        index,
        name,
        uuid: read_trimmed(&device.join("unique_id")).unwrap_or_default(),
        pci_bus_id: pci_bus_id(&device).unwrap_or_default(),
        memory_total_bytes: read_number(&device.join("mem_info_vram_total")).unwrap_or(0),
        memory_used_bytes: read_number(&device.join("mem_info_vram_used")).unwrap_or(0),
        utilization_percent: read_number(&device.join("gpu_busy_percent")),
        // hwmon temperatures are millidegrees Celsius.
        temperature_celsius: from_hwmon("temp1_input").map(|m| clamp_u32((m + 500) / 1000)),
        // hwmon power is microwatts. Recent kernels expose only power1_input on some parts.
        power_milliwatts: from_hwmon("power1_average")
            .or_else(|| from_hwmon("power1_input"))
            .map(|uw| clamp_u32(uw / 1000)),
        driver_version: driver_version.to_owned(),
        cuda_version: String::new(),
    }
}

/// The first `device/hwmon/hwmonN` directory, if any.
fn hwmon_dir(device: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<(u64, PathBuf)> = std::fs::read_dir(device.join("hwmon"))
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_str()?
                .strip_prefix("hwmon")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    dirs.sort();
    dirs.into_iter().next().map(|(_, path)| path)
}

/// The PCI address ("0000:83:00.0"). On a real system `device` is a symlink whose target ends
/// in the address; otherwise (fixture trees) the device's `uevent` names it.
fn pci_bus_id(device: &Path) -> Option<String> {
    if let Ok(target) = std::fs::read_link(device)
        && let Some(name) = target.file_name().and_then(|n| n.to_str())
    {
        return Some(name.to_owned());
    }
    let uevent = std::fs::read_to_string(device.join("uevent")).ok()?;
    uevent
        .lines()
        .find_map(|line| line.strip_prefix("PCI_SLOT_NAME="))
        .map(|s| s.trim().to_owned())
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn read_number<T: std::str::FromStr>(path: &Path) -> Option<T> {
    read_trimmed(path)?.parse().ok()
}

fn clamp_u32(value: i64) -> u32 {
    u32::try_from(value.max(0)).unwrap_or(u32::MAX)
}
