//! Made-up inventories for simulated agents (load tests, demos): plausible NVIDIA GPU boxes
//! derived from a seed, the same for the same seed on every run and every build.

use steward_proto::agent::v1::{Cpu, Gpu, GpuVendor, Inventory};

use super::{InventoryProbe, accelerator_for};

const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// GPU models a synthetic box is built from: (name, memory in GiB, idle power in W).
const GPU_MODELS: [(&str, u64, u32); 7] = [
    ("NVIDIA H100 80GB HBM3", 80, 70),
    ("NVIDIA A100-SXM4-80GB", 80, 60),
    ("NVIDIA A100-PCIE-40GB", 40, 35),
    ("NVIDIA L40S", 48, 35),
    ("NVIDIA RTX A6000", 48, 25),
    ("NVIDIA A10", 24, 20),
    ("NVIDIA L4", 24, 15),
];

/// CPU models: (name, physical cores per socket).
const CPU_MODELS: [(&str, u32); 4] = [
    ("AMD EPYC 7763 64-Core Processor", 64),
    ("AMD EPYC 9354 32-Core Processor", 32),
    ("Intel(R) Xeon(R) Platinum 8480+", 56),
    ("Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", 32),
];

/// A probe that reports a fixed, made-up inventory: 1, 2, 4 or 8 identical NVIDIA GPUs of
/// 24 to 80 GiB, 32 to 128 physical cores (SMT on), 128 to 1024 GiB of RAM, hostname
/// `sim-{seed}`. Readings are those of an idle box and do not move between calls.
#[derive(Debug, Clone)]
pub struct SyntheticProbe {
    inventory: Inventory,
}

impl SyntheticProbe {
    pub fn new(seed: u64) -> Self {
        Self {
            inventory: synthesize(seed),
        }
    }

    /// The inventory this probe reports, without going through the async trait.
    pub fn snapshot(&self) -> Inventory {
        self.inventory.clone()
    }
}

#[async_trait::async_trait]
impl InventoryProbe for SyntheticProbe {
    async fn inventory(&self) -> Inventory {
        self.inventory.clone()
    }
}

/// SplitMix64: a tiny generator with a fixed definition, so a seed means the same box across
/// versions of any random-number crate.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (n > 0); the modulo bias is irrelevant here.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[usize::try_from(self.below(items.len() as u64)).unwrap_or(0)]
    }
}

fn synthesize(seed: u64) -> Inventory {
    let mut rng = SplitMix64(seed);

    let (cpu_model, cores_per_socket) = rng.pick(&CPU_MODELS);
    // Keep the total within 32..=128 physical cores.
    let sockets = if cores_per_socket <= 64 && rng.below(2) == 1 {
        2
    } else {
        1
    };
    let physical_cores = cores_per_socket * sockets;
    let memory_total_bytes = rng.pick(&[128, 256, 512, 768, 1024]) * GIB;
    // Page cache and the agent's own processes: 85-97% available.
    let memory_available_bytes = memory_total_bytes / 100 * (85 + rng.below(13));
    let disk_total_bytes = rng.pick(&[2, 4, 8]) * TIB;
    let disk_free_bytes = disk_total_bytes / 100 * (40 + rng.below(50));

    let (gpu_name, gpu_gib, idle_watts) = rng.pick(&GPU_MODELS);
    let gpu_count = rng.pick(&[1u32, 2, 4, 8]);
    let gpus: Vec<Gpu> = (0..gpu_count)
        .map(|index| Gpu {
            vendor: GpuVendor::Nvidia as i32,
            index,
            name: gpu_name.to_owned(),
            uuid: uuid_from(&mut rng),
            pci_bus_id: format!("00000000:{:02X}:00.0", 0x17 + index * 0x10),
            memory_total_bytes: gpu_gib * GIB,
            // The driver's own reservation on an idle GPU: a few hundred MiB.
            memory_used_bytes: (256 + rng.below(512)) << 20,
            utilization_percent: Some(0),
            temperature_celsius: Some(28 + u32::try_from(rng.below(10)).unwrap_or(0)),
            power_milliwatts: Some((idle_watts + u32::try_from(rng.below(15)).unwrap_or(0)) * 1000),
            driver_version: "550.54.15".to_owned(),
            cuda_version: "12.4".to_owned(),
        })
        .collect();

    Inventory {
        hostname: format!("sim-{seed}"),
        os: "linux 6.8.0-45-generic".to_owned(),
        arch: "x86_64".to_owned(),
        cpu: Some(Cpu {
            model: cpu_model.to_owned(),
            logical_cores: physical_cores * 2,
            physical_cores,
        }),
        memory_total_bytes,
        memory_available_bytes,
        disk_total_bytes,
        disk_free_bytes,
        accelerator: accelerator_for(&gpus).to_owned(),
        gpus,
        probe_notes: Vec::new(),
        model_memory_limit_bytes: 0,
        // A simulated agent keeps no artifact cache to list.
        artifacts: Vec::new(),
        artifacts_listed: false,
    }
}

/// An NVML-style GPU UUID ("GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx").
fn uuid_from(rng: &mut SplitMix64) -> String {
    let (a, b) = (rng.next(), rng.next());
    format!(
        "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}
