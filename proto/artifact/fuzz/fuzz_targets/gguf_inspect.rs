//! Any bytes at all: `inspect` returns facts or an error, and never panics, overflows, or
//! allocates without bound.

#![no_main]

use libfuzzer_sys::fuzz_target;
use steward_artifact::gguf::{Limits, inspect};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(facts) = inspect(data, data.len() as u64, &limits) {
        // Whatever was accepted lies inside the input.
        assert!(facts.tensor_data_bytes <= data.len() as u64);
        let _ = facts.kv_cache_bytes(u64::from(u32::MAX));
    }
});
