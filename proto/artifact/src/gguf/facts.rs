//! What a validated header says about the model, for display and placement.

use std::collections::HashMap;

use super::GgufError;
use super::reader::{Entry, Header, Value};
use super::types::{GgmlType, file_type_name};

/// Added to the tensor bytes in [`GgufFacts::estimated_load_bytes`]: the runtime's own
/// buffers beyond the weights (compute graph, output buffers), KV cache excluded.
pub const LOAD_OVERHEAD_BYTES: u64 = 64 * 1024 * 1024;

/// What a GGUF header says about the model.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GgufFacts {
    pub version: u32,
    /// `general.architecture`, one of the allowed ones.
    pub architecture: String,
    /// `general.name`.
    pub name: Option<String>,
    /// The sum of every tensor's element count.
    pub parameter_count: u64,
    /// llama.cpp's name for `general.file_type` ("Q4_K_M") when present and known, else the
    /// upper-case ggml name of the tensor type holding the most elements ("Q8_0", "F16"), or
    /// "unknown" for a file without tensors.
    pub quantization: String,
    /// `{arch}.context_length`: the context the model was trained for.
    pub context_length: Option<u64>,
    /// `{arch}.block_count`: the number of layers.
    pub block_count: Option<u64>,
    /// `{arch}.embedding_length`.
    pub embedding_length: Option<u64>,
    /// `{arch}.attention.head_count`; `None` also when it is given per layer (an array).
    pub head_count: Option<u64>,
    /// `{arch}.attention.head_count_kv`; `None` also when it is given per layer (an array).
    pub head_count_kv: Option<u64>,
    pub tensor_count: u64,
    /// The sum of every tensor's data size, without padding.
    pub tensor_data_bytes: u64,
    /// Whether `tokenizer.chat_template` (the default template) is present.
    pub has_chat_template: bool,
    /// `tensor_data_bytes` + [`LOAD_OVERHEAD_BYTES`]; the KV cache comes on top
    /// ([`GgufFacts::kv_cache_bytes`]).
    pub estimated_load_bytes: u64,
}

impl GgufFacts {
    /// KV-cache bytes (f16) for a context of `context_tokens` tokens across all layers:
    /// `2 (K and V) * block_count * tokens * head_count_kv * (embedding_length / head_count)
    /// * 2 bytes`. `None` when a needed key is missing, `head_count` is zero, or the product
    /// overflows. A missing `head_count_kv` means no grouped-query attention, as in llama.cpp,
    /// so `head_count` stands in for it.
    ///
    /// Models whose head size is not `embedding_length / head_count` (they carry
    /// `{arch}.attention.key_length`, e.g. gemma3) get an approximation.
    pub fn kv_cache_bytes(&self, context_tokens: u64) -> Option<u64> {
        let head_count = self.head_count?;
        let head_dim = self.embedding_length?.checked_div(head_count)?;
        let kv_heads = self.head_count_kv.unwrap_or(head_count);
        2u64.checked_mul(self.block_count?)?
            .checked_mul(context_tokens)?
            .checked_mul(kv_heads)?
            .checked_mul(head_dim)?
            .checked_mul(2)
    }
}

pub(super) fn facts_from_header(header: &Header) -> Result<GgufFacts, GgufError> {
    let arch = &header.architecture;
    let entries = &header.entries;
    let arch_uint = |suffix: &str| optional_uint(entries, &format!("{arch}.{suffix}"));

    let mut parameter_count = 0u64;
    let mut tensor_data_bytes = 0u64;
    let mut elements_by_type: HashMap<GgmlType, u64> = HashMap::new();
    for t in &header.tensors {
        // Each tensor lies inside the file and they do not overlap, so these sums are bounded
        // by the file length (times at most 8 elements per byte); saturate all the same.
        parameter_count = parameter_count.saturating_add(t.elements);
        tensor_data_bytes = tensor_data_bytes.saturating_add(t.bytes);
        let n = elements_by_type.entry(t.ty).or_default();
        *n = n.saturating_add(t.elements);
    }

    let file_type = optional_uint(entries, "general.file_type")?;
    let quantization = match file_type.and_then(file_type_name) {
        Some(name) => name.to_string(),
        None => elements_by_type
            .iter()
            // Most elements wins; among equals, the lower type id, so the answer is stable.
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map_or_else(|| "unknown".to_string(), |(ty, _)| ty.name().to_uppercase()),
    };

    Ok(GgufFacts {
        version: header.version,
        architecture: arch.clone(),
        name: optional_string(entries, "general.name")?,
        parameter_count,
        quantization,
        context_length: arch_uint("context_length")?,
        block_count: arch_uint("block_count")?,
        embedding_length: arch_uint("embedding_length")?,
        head_count: arch_uint("attention.head_count")?,
        head_count_kv: arch_uint("attention.head_count_kv")?,
        tensor_count: header.tensors.len() as u64,
        tensor_data_bytes,
        has_chat_template: entries.contains_key("tokenizer.chat_template"),
        estimated_load_bytes: tensor_data_bytes.saturating_add(LOAD_OVERHEAD_BYTES),
    })
}

/// A count-like key: any unsigned integer, or a signed one that is not negative. `None` when
/// absent or given as an array (per-layer values); refused when of any other type.
fn optional_uint(entries: &HashMap<String, Entry>, key: &str) -> Result<Option<u64>, GgufError> {
    let Some(entry) = entries.get(key) else {
        return Ok(None);
    };
    match entry.value {
        Value::Uint(n) => Ok(Some(n)),
        Value::Int(n) if n >= 0 => Ok(Some(n.unsigned_abs())),
        Value::Array { elem_type, .. } if super::value_type::fixed_size(elem_type).is_some() => {
            Ok(None)
        }
        _ => Err(GgufError::WrongValueType {
            key: key.into(),
            expected: "a non-negative integer",
            found: match entry.value {
                Value::Int(n) => format!("{} {n}", entry.type_description()),
                _ => entry.type_description(),
            },
        }),
    }
}

fn optional_string(
    entries: &HashMap<String, Entry>,
    key: &str,
) -> Result<Option<String>, GgufError> {
    match entries.get(key) {
        None => Ok(None),
        Some(Entry {
            value: Value::Str(s),
            ..
        }) => Ok(Some(s.clone())),
        Some(entry) => Err(GgufError::WrongValueType {
            key: key.into(),
            expected: "a string",
            found: entry.type_description(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> GgufFacts {
        GgufFacts {
            version: 3,
            architecture: "llama".into(),
            name: None,
            parameter_count: 0,
            quantization: "F32".into(),
            context_length: Some(4096),
            block_count: Some(32),
            embedding_length: Some(4096),
            head_count: Some(32),
            head_count_kv: Some(8),
            tensor_count: 0,
            tensor_data_bytes: 0,
            has_chat_template: false,
            estimated_load_bytes: LOAD_OVERHEAD_BYTES,
        }
    }

    #[test]
    fn kv_cache_bytes_follows_the_f16_formula() {
        // Llama-3-8B-like: 2 * 32 layers * 8192 tokens * 8 kv heads * 128 head dim * 2 bytes.
        assert_eq!(facts().kv_cache_bytes(8192), Some(1024 * 1024 * 1024));
        assert_eq!(facts().kv_cache_bytes(0), Some(0));
    }

    #[test]
    fn kv_cache_bytes_falls_back_to_head_count_without_grouped_query_attention() {
        let f = GgufFacts {
            head_count_kv: None,
            ..facts()
        };
        assert_eq!(f.kv_cache_bytes(1), Some(2 * 32 * 32 * 128 * 2));
    }

    #[test]
    fn kv_cache_bytes_is_none_when_a_key_is_missing_zero_or_overflowing() {
        for f in [
            GgufFacts {
                block_count: None,
                ..facts()
            },
            GgufFacts {
                embedding_length: None,
                ..facts()
            },
            GgufFacts {
                head_count: None,
                ..facts()
            },
            GgufFacts {
                head_count: Some(0),
                ..facts()
            },
        ] {
            assert_eq!(f.kv_cache_bytes(1024), None, "{f:?}");
        }
        assert_eq!(facts().kv_cache_bytes(u64::MAX), None);
    }

    #[test]
    fn facts_round_trip_through_json() {
        let f = facts();
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(serde_json::from_str::<GgufFacts>(&json).unwrap(), f);
    }
}
