//! Choosing how many layers to offload to the GPU from the free VRAM and the GGUF facts.

use steward_artifact::gguf::GgufFacts;

use crate::config::GpuLayers;

/// VRAM kept free for llama.cpp's compute buffers and other users of the GPU.
const VRAM_RESERVE_BYTES: u64 = 512 << 20;

/// Layers to offload. `offload_supported` is false in CPU-only builds; `free_vram` is what
/// the agent measured (none without a GPU). Counts the output layer as one more layer, as
/// llama.cpp does (`n_gpu_layers = block_count + 1` offloads everything).
pub fn layers_to_offload(
    requested: GpuLayers,
    offload_supported: bool,
    free_vram: Option<u64>,
    facts: &GgufFacts,
    context_tokens: u64,
) -> u32 {
    match requested {
        GpuLayers::Fixed(n) => n,
        GpuLayers::Auto => {
            let (true, Some(free)) = (offload_supported, free_vram) else {
                return 0;
            };
            let blocks = facts.block_count.unwrap_or(0).max(1);
            let layers = blocks + 1;
            let weights_per_layer = facts.tensor_data_bytes.div_ceil(layers);
            let kv_per_layer = facts
                .kv_cache_bytes(context_tokens)
                .unwrap_or(0)
                .div_ceil(blocks);
            let budget = free.saturating_sub(VRAM_RESERVE_BYTES) / 10 * 9;
            let fit = budget / (weights_per_layer + kv_per_layer).max(1);
            u32::try_from(fit.min(layers)).unwrap_or(u32::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny_model::TinyModel;
    use steward_artifact::gguf::{Limits, inspect};

    fn facts() -> GgufFacts {
        let bytes = TinyModel::default().to_bytes();
        inspect(&bytes[..], bytes.len() as u64, &Limits::default()).unwrap()
    }

    #[test]
    fn without_a_gpu_nothing_is_offloaded() {
        let f = facts();
        assert_eq!(
            layers_to_offload(GpuLayers::Auto, false, Some(80 << 30), &f, 4096),
            0
        );
        assert_eq!(layers_to_offload(GpuLayers::Auto, true, None, &f, 4096), 0);
    }

    #[test]
    fn a_large_gpu_takes_every_layer_and_the_output() {
        assert_eq!(
            layers_to_offload(GpuLayers::Auto, true, Some(80 << 30), &facts(), 4096),
            3
        );
    }

    #[test]
    fn a_small_gpu_takes_the_layers_that_fit() {
        let f = GgufFacts {
            tensor_data_bytes: 33 << 30,
            block_count: Some(32),
            ..facts()
        };
        // 1 GiB per layer, and the KV cache of a tiny model is small: 9 GiB free leaves
        // (9 - 0.5) * 0.9 = 7.65 GiB.
        let n = layers_to_offload(GpuLayers::Auto, true, Some(9 << 30), &f, 4096);
        assert_eq!(n, 7);
    }

    #[test]
    fn a_fixed_count_is_used_as_given() {
        assert_eq!(
            layers_to_offload(GpuLayers::Fixed(5), false, None, &facts(), 1),
            5
        );
        assert_eq!("auto".parse::<GpuLayers>(), Ok(GpuLayers::Auto));
        assert_eq!("12".parse::<GpuLayers>(), Ok(GpuLayers::Fixed(12)));
        assert!("many".parse::<GpuLayers>().unwrap_err().contains("many"));
    }
}
