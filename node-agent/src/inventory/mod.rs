//! Hardware inventory: what a node has to run inference on.
//!
//! [`HostProbe`] reads the real host (procfs, sysfs for AMD GPUs, NVML for NVIDIA GPUs, the
//! free space of the agent's data directory); [`SyntheticProbe`] makes up a plausible GPU box
//! for simulated agents. Probes never fail: what could not be read is left empty and explained
//! in [`Inventory::probe_notes`].
//!
//! GPU indices count within a vendor (NVIDIA 0.., AMD 0..), as `CUDA_VISIBLE_DEVICES` and
//! `HIP_VISIBLE_DEVICES` do.

mod amd;
mod cpu;
mod nvidia;
mod synthetic;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use steward_proto::agent::v1::{Gpu, GpuVendor, Inventory};

pub use synthetic::SyntheticProbe;

#[async_trait::async_trait]
pub trait InventoryProbe: Send + Sync + std::fmt::Debug {
    /// Never fails: a probe that cannot run adds a line to `probe_notes` instead.
    async fn inventory(&self) -> Inventory;
}

/// Probes the machine the agent runs on. Cheap to clone; clones share the NVML handle.
#[derive(Debug, Clone)]
pub struct HostProbe {
    inner: Arc<HostConfig>,
    /// Reported as the inventory's `model_memory_limit_bytes`.
    memory_limit_bytes: Option<u64>,
}

#[derive(Debug)]
struct HostConfig {
    data_dir: PathBuf,
    proc_root: PathBuf,
    sys_root: PathBuf,
    /// `None`: NVML disabled (probing fixture trees).
    nvml: Option<nvidia::NvmlHandle>,
}

impl HostProbe {
    /// Probes the real host: /proc, /sys, NVML, free disk of `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self::build(data_dir.into(), "/proc".into(), "/sys".into(), true)
    }

    /// Same, with /proc and /sys read from other roots (fixture trees in tests); NVML disabled.
    pub fn with_roots(
        data_dir: impl Into<PathBuf>,
        proc_root: impl Into<PathBuf>,
        sys_root: impl Into<PathBuf>,
    ) -> Self {
        Self::build(data_dir.into(), proc_root.into(), sys_root.into(), false)
    }

    /// Reports `bytes` as the most memory the control plane may give to models here.
    pub fn with_memory_limit(mut self, bytes: Option<u64>) -> Self {
        self.memory_limit_bytes = bytes;
        self
    }

    fn build(data_dir: PathBuf, proc_root: PathBuf, sys_root: PathBuf, nvml: bool) -> Self {
        Self {
            memory_limit_bytes: None,
            inner: Arc::new(HostConfig {
                data_dir,
                proc_root,
                sys_root,
                nvml: nvml.then(nvidia::NvmlHandle::default),
            }),
        }
    }
}

#[async_trait::async_trait]
impl InventoryProbe for HostProbe {
    async fn inventory(&self) -> Inventory {
        let config = Arc::clone(&self.inner);
        // NVML and file reads block; keep them off the async workers.
        let probed = match tokio::task::spawn_blocking(move || config.probe()).await {
            Ok(inventory) => inventory,
            Err(e) => {
                tracing::error!(error = %e, "inventory probe did not complete");
                Inventory {
                    os: std::env::consts::OS.to_owned(),
                    arch: std::env::consts::ARCH.to_owned(),
                    accelerator: "cpu".to_owned(),
                    probe_notes: vec![format!("inventory probe did not complete: {e}")],
                    ..Inventory::default()
                }
            }
        };
        Inventory {
            model_memory_limit_bytes: self.memory_limit_bytes.unwrap_or(0),
            ..probed
        }
    }
}

impl HostConfig {
    fn probe(&self) -> Inventory {
        let mut notes = Vec::new();

        let hostname = match nix::unistd::gethostname() {
            Ok(name) => name.to_string_lossy().into_owned(),
            Err(e) => {
                notes.push(format!("hostname: {e}"));
                String::new()
            }
        };
        let cpu = cpu::read_cpu(&self.proc_root)
            .map_err(|e| {
                notes.push(format!(
                    "cpu: cannot read {}/cpuinfo: {e}",
                    self.proc_root.display()
                ))
            })
            .ok();
        let memory = cpu::read_memory(&self.proc_root)
            .map_err(|e| {
                notes.push(format!(
                    "memory: cannot read {}/meminfo: {e}",
                    self.proc_root.display()
                ))
            })
            .ok();
        // Listed before the free disk is read: bytes a pull writes in between then count
        // as still to come, never as free.
        let artifacts = crate::artifacts::listing(&self.data_dir)
            .map_err(|e| notes.push(format!("artifact cache: {e}")))
            .ok()
            .flatten();
        let (disk_total_bytes, disk_free_bytes) = disk_usage(&self.data_dir)
            .map_err(|e| notes.push(format!("disk: {e}")))
            .unwrap_or((0, 0));

        let mut gpus = match &self.nvml {
            Some(handle) => nvidia::nvidia_gpus(handle, &mut notes),
            None => Vec::new(),
        };
        gpus.extend(amd::amd_gpus(&self.sys_root, &mut notes));

        Inventory {
            hostname,
            os: os_name(&self.proc_root),
            arch: std::env::consts::ARCH.to_owned(),
            cpu,
            memory_total_bytes: memory.map_or(0, |m| m.total_bytes),
            memory_available_bytes: memory.map_or(0, |m| m.available_bytes),
            disk_total_bytes,
            disk_free_bytes,
            accelerator: accelerator_for(&gpus).to_owned(),
            gpus,
            probe_notes: notes,
            // The operator's setting, not a reading: `HostProbe::inventory` adds it.
            model_memory_limit_bytes: 0,
            artifacts_listed: artifacts.is_some(),
            artifacts: artifacts.unwrap_or_default(),
        }
    }
}

/// "linux 6.8.0-45-generic": the OS and, where procfs has it, the kernel release.
fn os_name(proc_root: &Path) -> String {
    let os = std::env::consts::OS;
    match std::fs::read_to_string(proc_root.join("sys/kernel/osrelease")) {
        Ok(release) if !release.trim().is_empty() => format!("{os} {}", release.trim()),
        _ => os.to_owned(),
    }
}

/// Total and free (available to unprivileged users) bytes of the filesystem holding `dir`,
/// or of its nearest existing ancestor when `dir` is not created yet.
fn disk_usage(dir: &Path) -> Result<(u64, u64), String> {
    let absolute = std::path::absolute(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let existing = absolute
        .ancestors()
        .find(|p| p.exists())
        .ok_or_else(|| format!("{}: no existing ancestor", dir.display()))?;
    let stat = nix::sys::statvfs::statvfs(existing)
        .map_err(|e| format!("cannot stat {}: {e}", existing.display()))?;
    // The field types differ between platforms; on 64-bit Linux they already are u64.
    #[allow(clippy::unnecessary_cast)]
    let (fragment, blocks, available) = (
        stat.fragment_size() as u64,
        stat.blocks() as u64,
        stat.blocks_available() as u64,
    );
    Ok((
        blocks.saturating_mul(fragment),
        available.saturating_mul(fragment),
    ))
}

/// What inference will run on: CUDA if there is any NVIDIA GPU, else ROCm if there is any AMD
/// GPU, else the CPU.
fn accelerator_for(gpus: &[Gpu]) -> &'static str {
    let has = |vendor: GpuVendor| gpus.iter().any(|g| g.vendor == vendor as i32);
    if has(GpuVendor::Nvidia) {
        "cuda"
    } else if has(GpuVendor::Amd) {
        "rocm"
    } else {
        "cpu"
    }
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A copy of the inventory with fast-moving readings (available memory, free disk, GPU memory used,
/// utilization, temperature, power) rounded coarsely, so the agent can send an update only when
/// something meaningful changed (the control plane writes to its database on each update).
///
/// Readings are rounded to the nearest step: available memory to 1/32 of the total (at least
/// 1 GiB), free disk to 1/64 of the total (at least 1 GiB), GPU memory used to 1/64 of the GPU's
/// memory (at least 256 MiB), utilization to 25 %, temperature to 10 °C, power to 50 W. The
/// bytes of a pull's partial file count not at all: they grow as free disk shrinks, whose
/// steps already tell. Everything else (hardware, totals, GPUs or cached artifacts appearing
/// or going, notes) is kept as is. A reading
/// that hovers at a step boundary can still flip between two values; callers that care should
/// also limit how often they send.
pub fn significant(inv: &Inventory) -> Inventory {
    let mut out = inv.clone();
    out.memory_available_bytes = round_to(
        inv.memory_available_bytes,
        (inv.memory_total_bytes / 32).max(GIB),
    );
    out.disk_free_bytes = round_to(inv.disk_free_bytes, (inv.disk_total_bytes / 64).max(GIB));
    for gpu in &mut out.gpus {
        gpu.memory_used_bytes = round_to(
            gpu.memory_used_bytes,
            (gpu.memory_total_bytes / 64).max(256 * MIB),
        );
        gpu.utilization_percent = gpu.utilization_percent.map(|u| round_u32(u, 25));
        gpu.temperature_celsius = gpu.temperature_celsius.map(|t| round_u32(t, 10));
        gpu.power_milliwatts = gpu.power_milliwatts.map(|p| round_u32(p, 50_000));
    }
    for artifact in &mut out.artifacts {
        if !artifact.complete {
            artifact.bytes = 0;
        }
    }
    out
}

/// `value` rounded to the nearest multiple of `step` (> 0).
fn round_to(value: u64, step: u64) -> u64 {
    value.saturating_add(step / 2) / step * step
}

fn round_u32(value: u32, step: u32) -> u32 {
    u32::try_from(round_to(value.into(), step.into())).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_proto::agent::v1::Cpu;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/inventory")
            .join(name)
    }

    fn fixture_probe(name: &str, data_dir: &Path) -> HostProbe {
        let root = fixture(name);
        HostProbe::with_roots(data_dir, root.join("proc"), root.join("sys"))
    }

    #[test]
    fn cpu_and_memory_are_parsed_from_procfs_fixture() {
        let proc_root = fixture("amd-box/proc");
        let cpu = cpu::read_cpu(&proc_root).unwrap();
        assert_eq!(
            cpu,
            Cpu {
                model: "AMD EPYC 72F3 8-Core Processor".into(),
                logical_cores: 16,
                physical_cores: 8,
            }
        );
        let memory = cpu::read_memory(&proc_root).unwrap();
        assert_eq!(memory.total_bytes, 263_921_236 * 1024);
        assert_eq!(memory.available_bytes, 251_765_020 * 1024);

        // Two sockets with the same core ids: pairs, not core ids alone, count.
        let cpu = cpu::read_cpu(&fixture("no-gpu/proc")).unwrap();
        assert_eq!(cpu.model, "Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz");
        assert_eq!((cpu.logical_cores, cpu.physical_cores), (8, 4));
    }

    #[test]
    fn cpuinfo_without_topology_counts_logical_cores() {
        // aarch64 shape: no model name, no physical/core ids.
        let text = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n\n\
                    processor\t: 1\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n\n\
                    Hardware\t: Neoverse-N1 board\n";
        let cpu = cpu::parse_cpuinfo(text);
        assert_eq!(cpu.logical_cores, 2);
        assert_eq!(cpu.physical_cores, 2);
        assert_eq!(cpu.model, "Neoverse-N1 board");

        let old_kernel = "MemTotal:  2048 kB\nMemFree:  1024 kB\n";
        let memory = cpu::parse_meminfo(old_kernel).unwrap();
        assert_eq!(
            (memory.total_bytes, memory.available_bytes),
            (2048 * 1024, 1024 * 1024)
        );
        assert!(cpu::parse_meminfo("garbage").is_none());
    }

    #[tokio::test]
    async fn the_operators_memory_limit_is_reported_beside_the_probed_memory() {
        let data = tempfile::tempdir().unwrap();
        let unlimited = fixture_probe("amd-box", data.path()).inventory().await;
        assert_eq!(unlimited.model_memory_limit_bytes, 0);
        let limited = fixture_probe("amd-box", data.path())
            .with_memory_limit(Some(8 << 30))
            .inventory()
            .await;
        assert_eq!(limited.model_memory_limit_bytes, 8 << 30);
        assert_eq!(limited.memory_total_bytes, unlimited.memory_total_bytes);
    }

    #[tokio::test]
    async fn amd_gpus_are_read_from_sysfs_fixture() {
        let data = tempfile::tempdir().unwrap();
        let inv = fixture_probe("amd-box", data.path()).inventory().await;

        assert_eq!(inv.accelerator, "rocm");
        assert!(inv.probe_notes.is_empty(), "{:?}", inv.probe_notes);
        assert_eq!(inv.os, format!("{} 6.8.0-45-generic", std::env::consts::OS));
        assert_eq!(inv.cpu.as_ref().unwrap().logical_cores, 16);
        assert_eq!(inv.memory_total_bytes, 263_921_236 * 1024);
        assert!(inv.disk_total_bytes > 0);
        assert!(!inv.hostname.is_empty());

        // card0 is the BMC's ASPEED VGA, renderD128/129 are the same GPUs again.
        assert_eq!(inv.gpus.len(), 2, "{:#?}", inv.gpus);
        let mi210 = &inv.gpus[0];
        assert_eq!(
            mi210,
            &Gpu {
                vendor: GpuVendor::Amd as i32,
                index: 0,
                name: "AMD Instinct MI210".into(),
                uuid: "5c9a3b1e8f2d4a71".into(),
                pci_bus_id: "0000:83:00.0".into(),
                memory_total_bytes: 68_702_699_520,
                memory_used_bytes: 12_884_901_888,
                utilization_percent: Some(37),
                temperature_celsius: Some(41),
                power_milliwatts: Some(89_000),
                driver_version: "6.7.0".into(),
                cuda_version: String::new(),
            }
        );
        // A consumer card: empty product_name, no unique_id, power1_input only.
        let radeon = &inv.gpus[1];
        assert_eq!(radeon.index, 1);
        assert_eq!(radeon.name, "AMD GPU 0x744c");
        assert_eq!(radeon.uuid, "");
        assert_eq!(radeon.pci_bus_id, "0000:c3:00.0");
        assert_eq!(radeon.memory_total_bytes, 25_753_026_560);
        assert_eq!(radeon.utilization_percent, Some(0));
        assert_eq!(radeon.temperature_celsius, Some(34));
        assert_eq!(radeon.power_milliwatts, Some(21_000));
    }

    #[tokio::test]
    async fn a_machine_without_gpus_reports_cpu_accelerator() {
        let data = tempfile::tempdir().unwrap();
        let inv = fixture_probe("no-gpu", data.path()).inventory().await;
        assert!(inv.gpus.is_empty(), "{:#?}", inv.gpus);
        assert_eq!(inv.accelerator, "cpu");
        assert_eq!(inv.memory_total_bytes, 32_765_572 * 1024);
        assert_eq!(
            inv.os,
            format!("{} 5.15.0-119-generic", std::env::consts::OS)
        );

        // No /sys at all (a container): still no GPU, and nothing to complain about.
        let inv = HostProbe::with_roots(
            data.path(),
            fixture("no-gpu/proc"),
            data.path().join("no-sys"),
        )
        .inventory()
        .await;
        assert_eq!(inv.accelerator, "cpu");
        assert!(inv.probe_notes.is_empty(), "{:?}", inv.probe_notes);
    }

    #[tokio::test]
    async fn unreadable_procfs_becomes_probe_notes() {
        let data = tempfile::tempdir().unwrap();
        let missing = data.path().join("missing");
        let inv = HostProbe::with_roots(data.path().join("not/yet/created"), &missing, &missing)
            .inventory()
            .await;
        assert_eq!(inv.cpu, None);
        assert_eq!(inv.memory_total_bytes, 0);
        assert_eq!(inv.os, std::env::consts::OS);
        assert!(
            inv.probe_notes.iter().any(|n| n.starts_with("cpu: ")),
            "{:?}",
            inv.probe_notes
        );
        assert!(
            inv.probe_notes.iter().any(|n| n.starts_with("memory: ")),
            "{:?}",
            inv.probe_notes
        );
        // The data dir does not exist yet: its nearest existing ancestor is measured.
        assert!(inv.disk_total_bytes > 0);
    }

    #[test]
    fn connector_entries_are_not_mistaken_for_cards() {
        let sys = tempfile::tempdir().unwrap();
        let drm = sys.path().join("class/drm");
        let write = |path: &str, text: &str| {
            let path = drm.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        // Real cards, numbered so that text order (card10 < card2) differs from card order.
        // card10's device is a symlink to its PCI directory, as on a real system.
        let pci = sys.path().join("devices/pci0000:80/0000:81:00.0");
        std::fs::create_dir_all(&pci).unwrap();
        std::fs::write(pci.join("vendor"), "0x1002\n").unwrap();
        std::fs::write(pci.join("device"), "0x74a1\n").unwrap();
        std::fs::create_dir_all(drm.join("card10")).unwrap();
        std::os::unix::fs::symlink(&pci, drm.join("card10/device")).unwrap();
        write("card2/device/vendor", "0x1002\n");
        write("card2/device/device", "0x740f\n");
        // Connector and render entries that look like AMD devices if not skipped.
        for fake in [
            "card2-DP-1",
            "card10-HDMI-A-1",
            "renderD128",
            "card",
            "cardX",
        ] {
            write(&format!("{fake}/device/vendor"), "0x1002\n");
            write(&format!("{fake}/device/mem_info_vram_total"), "1024\n");
        }
        write("version", "drm 1.1.0 20060810\n");

        let mut notes = Vec::new();
        let gpus = amd::amd_gpus(sys.path(), &mut notes);
        assert!(notes.is_empty(), "{notes:?}");
        let seen: Vec<_> = gpus
            .iter()
            .map(|g| (g.index, g.name.as_str(), g.pci_bus_id.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                (0, "AMD GPU 0x740f", ""),
                (1, "AMD GPU 0x74a1", "0000:81:00.0")
            ]
        );
        // Missing readings stay empty rather than dropping the GPU.
        assert_eq!(gpus[0].utilization_percent, None);
        assert_eq!(gpus[0].temperature_celsius, None);
        assert_eq!(gpus[0].memory_total_bytes, 0);
        assert_eq!(accelerator_for(&gpus), "rocm");
    }

    #[test]
    fn significant_ignores_small_fluctuations_but_not_new_gpus() {
        let mut base = SyntheticProbe::new(7).snapshot();
        // Put readings mid-step so the small moves below cannot cross a boundary.
        base.memory_total_bytes = 256 * GIB;
        base.memory_available_bytes = 200 * GIB;
        base.disk_total_bytes = 4096 * GIB;
        base.disk_free_bytes = 2000 * GIB;
        for gpu in &mut base.gpus {
            gpu.memory_total_bytes = 80 * GIB;
            gpu.memory_used_bytes = 10 * GIB;
            gpu.utilization_percent = Some(50);
            gpu.temperature_celsius = Some(60);
            gpu.power_milliwatts = Some(300_000);
        }

        let mut wiggled = base.clone();
        wiggled.memory_available_bytes += 700 * MIB;
        wiggled.disk_free_bytes -= 3 * GIB;
        for gpu in &mut wiggled.gpus {
            gpu.memory_used_bytes += 200 * MIB;
            gpu.utilization_percent = Some(58);
            gpu.temperature_celsius = Some(63);
            gpu.power_milliwatts = Some(280_000);
        }
        assert_ne!(base, wiggled);
        assert_eq!(significant(&base), significant(&wiggled));
        assert_eq!(significant(&significant(&base)), significant(&base));

        // A model loading onto a GPU is significant.
        let mut loaded = base.clone();
        loaded.gpus[0].memory_used_bytes += 30 * GIB;
        assert_ne!(significant(&base), significant(&loaded));

        // So is a GPU appearing, and the accelerator changing with it.
        let mut grown = base.clone();
        let mut extra = grown.gpus[0].clone();
        extra.index = u32::try_from(grown.gpus.len()).unwrap();
        grown.gpus.push(extra);
        assert_ne!(significant(&base), significant(&grown));
        let mut cpu_only = base.clone();
        cpu_only.gpus.clear();
        cpu_only.accelerator = "cpu".into();
        assert_ne!(significant(&base), significant(&cpu_only));

        // A reading becoming unavailable is a change too.
        let mut lost = base.clone();
        lost.gpus[0].temperature_celsius = None;
        assert_ne!(significant(&base), significant(&lost));

        // A pull's partial file growing is not (free disk tells); an artifact appearing
        // in the cache, or a pull completing, is.
        let partial = |bytes| steward_proto::agent::v1::CachedArtifact {
            digest: "ab".repeat(32),
            bytes,
            complete: false,
        };
        let mut pulling = base.clone();
        pulling.artifacts_listed = true;
        pulling.artifacts = vec![partial(1 << 20)];
        let mut further = pulling.clone();
        further.artifacts = vec![partial(2 << 20)];
        assert_eq!(significant(&pulling), significant(&further));
        assert_ne!(significant(&base), significant(&pulling));
        let mut done = pulling.clone();
        done.artifacts[0].complete = true;
        assert_ne!(significant(&pulling), significant(&done));
    }

    #[tokio::test]
    async fn synthetic_probe_is_deterministic_per_seed() {
        let a = SyntheticProbe::new(42).inventory().await;
        assert_eq!(a, SyntheticProbe::new(42).inventory().await);
        assert_eq!(a.hostname, "sim-42");
        assert_ne!(a, SyntheticProbe::new(43).inventory().await);

        let mut gpu_counts = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let inv = SyntheticProbe::new(seed).snapshot();
            assert_eq!(inv.hostname, format!("sim-{seed}"));
            assert_eq!(inv.accelerator, "cuda");
            assert!((1..=8).contains(&inv.gpus.len()));
            gpu_counts.insert(inv.gpus.len());
            let cpu = inv.cpu.as_ref().unwrap();
            assert!((32..=128).contains(&cpu.physical_cores), "{cpu:?}");
            assert!(cpu.logical_cores >= cpu.physical_cores);
            assert!((128 * GIB..=1024 * GIB).contains(&inv.memory_total_bytes));
            assert!(inv.memory_available_bytes <= inv.memory_total_bytes);
            assert!(inv.disk_free_bytes <= inv.disk_total_bytes);
            let uuids: std::collections::HashSet<_> = inv.gpus.iter().map(|g| &g.uuid).collect();
            assert_eq!(uuids.len(), inv.gpus.len());
            for (i, gpu) in inv.gpus.iter().enumerate() {
                assert_eq!(gpu.vendor, GpuVendor::Nvidia as i32);
                assert_eq!(gpu.index as usize, i);
                assert!((24 * GIB..=80 * GIB).contains(&gpu.memory_total_bytes));
                assert!(gpu.memory_used_bytes < gpu.memory_total_bytes);
                assert_eq!(gpu.cuda_version, "12.4");
            }
        }
        assert!(gpu_counts.len() > 1, "seeds should give different boxes");
    }

    #[tokio::test]
    async fn host_probe_reports_this_machine() {
        let data = tempfile::tempdir().unwrap();
        let probe = HostProbe::new(data.path().join("state"));
        let inv = probe.inventory().await;
        let cpu = inv.cpu.as_ref().expect("cpu");
        assert!(cpu.logical_cores > 0 && cpu.physical_cores > 0, "{cpu:?}");
        assert!(inv.memory_total_bytes > 0 && inv.memory_available_bytes > 0);
        assert!(inv.disk_total_bytes > 0);
        assert!(!inv.hostname.is_empty());
        assert_eq!(inv.arch, std::env::consts::ARCH);
        assert_eq!(inv.accelerator, accelerator_for(&inv.gpus));
        if inv.gpus.is_empty() {
            // This machine (and CI): no GPU, no NVIDIA driver library.
            assert_eq!(inv.accelerator, "cpu");
            assert!(
                inv.probe_notes.iter().any(|n| n.starts_with("nvidia: ")),
                "{:?}",
                inv.probe_notes
            );
        }
        // A second probe reuses (or retries) the NVML handle and agrees on the hardware.
        let again = probe.inventory().await;
        assert_eq!(again.gpus.len(), inv.gpus.len());
        assert_eq!(again.cpu, inv.cpu);
    }
}
