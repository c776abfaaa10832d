//! A small GGUF writer for tests: builds files that [`super::inspect`] and llama.cpp accept,
//! or, with a raw value or tensor type and some byte surgery, files that must be refused.
//!
//! The layout is the one gguf-py and llama.cpp write: header, metadata, tensor infos, padding
//! to the alignment, then each tensor's data at an aligned offset, padded to the alignment.
//! Dimensions are in ggml order, fastest-varying first: a `[n_vocab, n_embd]` matrix in
//! PyTorch terms is `&[n_embd, n_vocab]` here.
//!
//! ```
//! use steward_artifact::gguf::{Limits, inspect, writer::GgufWriter};
//!
//! let bytes = GgufWriter::new(3)
//!     .kv_string("general.architecture", "llama")
//!     .kv_u32("llama.block_count", 1)
//!     .tensor_f32("output_norm.weight", &[4], &[1.0; 4])
//!     .to_bytes();
//! let facts = inspect(&bytes[..], bytes.len() as u64, &Limits::default()).unwrap();
//! assert_eq!(facts.parameter_count, 4);
//! ```

use std::path::Path;

use super::DEFAULT_ALIGNMENT;
use super::types::{GgmlType, value_type};

/// Builds a GGUF file in memory. Methods consume and return the builder.
#[derive(Clone, Debug)]
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    kvs: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<Tensor>,
}

#[derive(Clone, Debug)]
struct Tensor {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    data: Vec<u8>,
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn pad_to(out: &mut Vec<u8>, alignment: u64) {
    let len = out.len() as u64;
    let padded = len.next_multiple_of(alignment);
    out.resize(padded as usize, 0);
}

impl GgufWriter {
    /// An empty file of the given GGUF version (2 or 3 for a valid file; any value is written).
    pub fn new(version: u32) -> Self {
        Self {
            version,
            alignment: DEFAULT_ALIGNMENT,
            kvs: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Appends a metadata pair with an already encoded value, written as is: for values this
    /// writer has no method for, and for malformed files.
    pub fn kv_raw(mut self, key: &str, value_type: u32, value: impl Into<Vec<u8>>) -> Self {
        self.kvs.push((key.to_string(), value_type, value.into()));
        self
    }

    pub fn kv_u8(self, key: &str, v: u8) -> Self {
        self.kv_raw(key, value_type::U8, v.to_le_bytes())
    }

    pub fn kv_i8(self, key: &str, v: i8) -> Self {
        self.kv_raw(key, value_type::I8, v.to_le_bytes())
    }

    pub fn kv_u16(self, key: &str, v: u16) -> Self {
        self.kv_raw(key, value_type::U16, v.to_le_bytes())
    }

    pub fn kv_i16(self, key: &str, v: i16) -> Self {
        self.kv_raw(key, value_type::I16, v.to_le_bytes())
    }

    pub fn kv_u32(self, key: &str, v: u32) -> Self {
        self.kv_raw(key, value_type::U32, v.to_le_bytes())
    }

    pub fn kv_i32(self, key: &str, v: i32) -> Self {
        self.kv_raw(key, value_type::I32, v.to_le_bytes())
    }

    pub fn kv_u64(self, key: &str, v: u64) -> Self {
        self.kv_raw(key, value_type::U64, v.to_le_bytes())
    }

    pub fn kv_i64(self, key: &str, v: i64) -> Self {
        self.kv_raw(key, value_type::I64, v.to_le_bytes())
    }

    pub fn kv_f32(self, key: &str, v: f32) -> Self {
        self.kv_raw(key, value_type::F32, v.to_le_bytes())
    }

    pub fn kv_f64(self, key: &str, v: f64) -> Self {
        self.kv_raw(key, value_type::F64, v.to_le_bytes())
    }

    pub fn kv_bool(self, key: &str, v: bool) -> Self {
        self.kv_raw(key, value_type::BOOL, [u8::from(v)])
    }

    pub fn kv_string(self, key: &str, v: &str) -> Self {
        let mut value = Vec::with_capacity(8 + v.len());
        put_string(&mut value, v);
        self.kv_raw(key, value_type::STRING, value)
    }

    /// An array of fixed-size elements of `elem_type`, each already little-endian encoded.
    fn kv_array<const N: usize>(
        self,
        key: &str,
        elem_type: u32,
        items: impl ExactSizeIterator<Item = [u8; N]>,
    ) -> Self {
        let mut value = Vec::with_capacity(12 + N * items.len());
        value.extend_from_slice(&elem_type.to_le_bytes());
        value.extend_from_slice(&(items.len() as u64).to_le_bytes());
        for item in items {
            value.extend_from_slice(&item);
        }
        self.kv_raw(key, value_type::ARRAY, value)
    }

    pub fn kv_string_array<S: AsRef<str>>(self, key: &str, items: &[S]) -> Self {
        let mut value = Vec::new();
        value.extend_from_slice(&value_type::STRING.to_le_bytes());
        value.extend_from_slice(&(items.len() as u64).to_le_bytes());
        for item in items {
            put_string(&mut value, item.as_ref());
        }
        self.kv_raw(key, value_type::ARRAY, value)
    }

    pub fn kv_f32_array(self, key: &str, items: &[f32]) -> Self {
        self.kv_array(key, value_type::F32, items.iter().map(|v| v.to_le_bytes()))
    }

    pub fn kv_i32_array(self, key: &str, items: &[i32]) -> Self {
        self.kv_array(key, value_type::I32, items.iter().map(|v| v.to_le_bytes()))
    }

    pub fn kv_u32_array(self, key: &str, items: &[u32]) -> Self {
        self.kv_array(key, value_type::U32, items.iter().map(|v| v.to_le_bytes()))
    }

    pub fn kv_bool_array(self, key: &str, items: &[bool]) -> Self {
        self.kv_array(key, value_type::BOOL, items.iter().map(|&v| [u8::from(v)]))
    }

    /// Sets the alignment of the tensor data and writes it as `general.alignment` (a `u32`).
    ///
    /// # Panics
    /// When `n` is not a power of two. (Write a bad `general.alignment` with [`Self::kv_u32`].)
    pub fn alignment(mut self, n: u32) -> Self {
        assert!(n.is_power_of_two(), "alignment {n} is not a power of two");
        self.alignment = n.into();
        self.kv_u32("general.alignment", n)
    }

    /// Appends a tensor with its data already encoded, written as is (the data size is not
    /// checked against the dimensions and type, so broken files can be built too).
    pub fn tensor_raw(
        mut self,
        name: &str,
        dims: &[u64],
        ggml_type: impl Into<u32>,
        data: impl Into<Vec<u8>>,
    ) -> Self {
        self.tensors.push(Tensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            type_id: ggml_type.into(),
            data: data.into(),
        });
        self
    }

    /// Appends an F32 tensor.
    ///
    /// # Panics
    /// When `data.len()` is not the product of `dims`.
    pub fn tensor_f32(self, name: &str, dims: &[u64], data: &[f32]) -> Self {
        check_len(name, dims, data.len());
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor_raw(name, dims, GgmlType::F32, bytes)
    }

    /// Appends an F16 tensor, converting `data` to half precision (round to nearest even).
    ///
    /// # Panics
    /// When `data.len()` is not the product of `dims`.
    pub fn tensor_f16(self, name: &str, dims: &[u64], data: &[f32]) -> Self {
        check_len(name, dims, data.len());
        let bytes: Vec<u8> = data
            .iter()
            .flat_map(|&v| f32_to_f16_bits(v).to_le_bytes())
            .collect();
        self.tensor_raw(name, dims, GgmlType::F16, bytes)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (key, value_type, value) in &self.kvs {
            put_string(&mut out, key);
            out.extend_from_slice(&value_type.to_le_bytes());
            out.extend_from_slice(value);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.type_id.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (t.data.len() as u64).next_multiple_of(self.alignment);
        }
        pad_to(&mut out, self.alignment);
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            pad_to(&mut out, self.alignment);
        }
        out
    }

    /// Writes the file to `path`.
    pub fn write_to(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_bytes())
    }
}

fn check_len(name: &str, dims: &[u64], len: usize) {
    let expected = dims.iter().product::<u64>();
    assert_eq!(
        expected, len as u64,
        "tensor `{name}`: dimensions {dims:?} need {expected} values, got {len}"
    );
}

/// IEEE 754 binary16 bits of `x`, rounded to nearest, ties to even.
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let mant = bits & 0x007f_ffff;
    if exp == 0xff {
        // Infinity, or NaN kept quiet.
        return sign | 0x7c00 | if mant != 0 { 0x0200 } else { 0 };
    }
    let half_exp = exp - 127 + 15;
    if half_exp >= 0x1f {
        return sign | 0x7c00;
    }
    if half_exp <= 0 {
        // Subnormal in half precision (or zero): value = m * 2^-24.
        let shift = (126 - exp) as u32; // 14 or more here
        if shift > 24 {
            return sign;
        }
        let full = mant | 0x0080_0000;
        let m = full >> shift;
        let rest = full & ((1 << shift) - 1);
        let halfway = 1 << (shift - 1);
        let round_up = rest > halfway || (rest == halfway && m & 1 == 1);
        return sign | (m + u32::from(round_up)) as u16;
    }
    let half = ((half_exp as u32) << 10) | (mant >> 13);
    let rest = mant & 0x1fff;
    let round_up = rest > 0x1000 || (rest == 0x1000 && half & 1 == 1);
    // A carry out of the mantissa correctly bumps the exponent, up to infinity.
    sign | (half + u32::from(round_up)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_known_bit_patterns() {
        for (x, bits) in [
            (0.0f32, 0x0000u16),
            (-0.0, 0x8000),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (0.5, 0x3800),
            (65504.0, 0x7bff),
            (65520.0, 0x7c00),
            (1.0e9, 0x7c00),
            (f32::INFINITY, 0x7c00),
            (6.103_515_6e-5, 0x0400),
            (5.960_464_5e-8, 0x0001),
            (2.0e-8, 0x0000),
            (1.000_488_3, 0x3c00),
            (1.001_464_8, 0x3c02),
        ] {
            assert_eq!(f32_to_f16_bits(x), bits, "{x}");
        }
        assert_eq!(f32_to_f16_bits(f32::NAN) & 0x7c00, 0x7c00);
        assert_ne!(f32_to_f16_bits(f32::NAN) & 0x03ff, 0);
    }

    #[test]
    fn tensors_are_laid_out_at_aligned_offsets_after_aligned_header() {
        let bytes = GgufWriter::new(3)
            .alignment(64)
            .tensor_f32("a", &[3], &[1.0, 2.0, 3.0])
            .tensor_f32("b", &[2], &[4.0, 5.0])
            .to_bytes();
        assert_eq!(bytes.len() % 64, 0);
        let b_data: Vec<u8> = [4.0f32, 5.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let at = bytes.len() - 64;
        assert_eq!(&bytes[at..at + 8], &b_data[..]);
    }
}
