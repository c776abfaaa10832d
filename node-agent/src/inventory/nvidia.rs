//! NVIDIA GPUs through NVML (`libnvidia-ml.so`, loaded at run time by `nvml-wrapper`).
//!
//! Every call here blocks (it talks to the driver); callers run it on a blocking thread.

use std::sync::{Arc, Mutex, PoisonError};

use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml, cuda_driver_version_major, cuda_driver_version_minor};
use steward_proto::agent::v1::{Gpu, GpuVendor};

/// A lazily initialised NVML handle, shared by every probe of one [`super::HostProbe`].
///
/// Unlike a `OnceLock`, a failed initialisation is not remembered: the agent may start before
/// the NVIDIA kernel module is loaded, and a later probe should then find the GPUs. A failing
/// `nvmlInit` is cheap (a `dlopen` miss or an immediate driver error), so retrying it on each
/// probe costs little.
#[derive(Debug, Default)]
pub(super) struct NvmlHandle {
    nvml: Mutex<Option<Arc<Nvml>>>,
}

impl NvmlHandle {
    /// The NVML handle, initialising it on first success.
    fn get(&self) -> Result<Arc<Nvml>, NvmlError> {
        let mut slot = self.nvml.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(nvml) = slot.as_ref() {
            return Ok(Arc::clone(nvml));
        }
        let nvml = Arc::new(Nvml::init()?);
        *slot = Some(Arc::clone(&nvml));
        Ok(nvml)
    }
}

/// NVIDIA GPUs visible to NVML. When NVML cannot be used, or sees no device, a note says so.
pub(super) fn nvidia_gpus(handle: &NvmlHandle, notes: &mut Vec<String>) -> Vec<Gpu> {
    let nvml = match handle.get() {
        Ok(nvml) => nvml,
        // The common case on a machine without the driver: say which library is missing,
        // without the wrapper's "a libloading error occurred" preamble.
        Err(NvmlError::LibloadingError(e)) => {
            notes.push(format!("nvidia: NVML unavailable: {e}"));
            return Vec::new();
        }
        Err(e) => {
            notes.push(format!("nvidia: NVML unavailable: {e}"));
            return Vec::new();
        }
    };
    let count = match nvml.device_count() {
        Ok(count) => count,
        Err(e) => {
            notes.push(format!("nvidia: cannot count devices: {e}"));
            return Vec::new();
        }
    };
    if count == 0 {
        notes.push("nvidia: NVML is loaded but sees no device".to_owned());
        return Vec::new();
    }

    let driver_version = nvml.sys_driver_version().unwrap_or_default();
    let cuda_version = nvml
        .sys_cuda_driver_version()
        .map(|v| {
            format!(
                "{}.{}",
                cuda_driver_version_major(v),
                cuda_driver_version_minor(v)
            )
        })
        .unwrap_or_default();

    let mut gpus = Vec::new();
    for index in 0..count {
        match nvml.device_by_index(index) {
            Ok(device) => gpus.push(read_device(&device, index, &driver_version, &cuda_version)),
            // Without a handle nothing about the GPU can be read (it may have fallen off the
            // bus); it cannot run inference either, so it is reported as a note only.
            Err(e) => notes.push(format!("nvidia: GPU {index}: {e}")),
        }
    }
    gpus
}

/// Reads one device; a reading that fails (unsupported on this part, e.g. utilization under
/// MIG) leaves its field empty.
fn read_device(device: &Device<'_>, index: u32, driver_version: &str, cuda_version: &str) -> Gpu {
    let memory = device.memory_info().ok();
    Gpu {
        vendor: GpuVendor::Nvidia as i32,
        index,
        name: device.name().unwrap_or_default(),
        uuid: device.uuid().unwrap_or_default(),
        pci_bus_id: device.pci_info().map(|p| p.bus_id).unwrap_or_default(),
        memory_total_bytes: memory.as_ref().map_or(0, |m| m.total),
        memory_used_bytes: memory.as_ref().map_or(0, |m| m.used),
        utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
        temperature_celsius: device.temperature(TemperatureSensor::Gpu).ok(),
        power_milliwatts: device.power_usage().ok(),
        driver_version: driver_version.to_owned(),
        cuda_version: cuda_version.to_owned(),
    }
}
