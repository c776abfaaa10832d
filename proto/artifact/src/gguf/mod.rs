//! A strict, bounded GGUF header reader of our own (no llama.cpp).
//!
//! [`inspect`] reads the header of a GGUF file (versions 2 and 3, little-endian), checks
//! everything that can be checked without reading tensor data, and returns the [`GgufFacts`]
//! used for display and placement. Anything unusual is refused with a [`GgufError`] naming what
//! is wrong and where; nothing is trusted before it has been bounded:
//!
//! - every count (tensors, key-value pairs, array elements) is checked against [`Limits`]
//!   before anything is read or allocated for it, and every length against the bytes left in
//!   the file, so a lying header can make us neither allocate nor loop much;
//! - keys and strings (array elements included) must be UTF-8 and no longer than the limit;
//!   tensor names no longer than ggml's 63 bytes;
//! - every value type must be known; arrays of arrays are refused (as llama.cpp does);
//! - keys and tensor names must be unique;
//! - `general.architecture` must be present, a string, and in the allow-list;
//!   `general.alignment`, when present, a `u32` power of two no larger than 1 MiB;
//!   `tokenizer.chat_template` (and `tokenizer.chat_template.*`) strings no longer than the
//!   chat-template limit; the keys the facts are read from must have the expected type;
//! - every tensor: known ggml type, 1..=`max_dims` dimensions, none zero, the first a multiple
//!   of the type's block size (ggml's rule, which makes the element count one too), sizes
//!   computed with checked arithmetic, offset aligned, data inside the file, no two overlapping.
//!
//! Tensor data is never read: the only thing checked past the header is that the ranges the
//! tensor infos describe lie inside `total_len`.
//!
//! [`writer::GgufWriter`] builds valid (or, with byte surgery, deliberately broken) files for
//! tests in this and other crates.

mod facts;
mod reader;
pub mod stream;
mod types;
pub mod writer;

pub use facts::{GgufFacts, LOAD_OVERHEAD_BYTES};
pub use types::{GgmlType, file_type_name, value_type};

use std::io::BufReader;
use std::path::Path;

/// GGUF's alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The largest `general.alignment` accepted.
pub const MAX_ALIGNMENT: u64 = 1024 * 1024;
/// ggml keeps tensor names in a 64-byte buffer with a terminating NUL (`GGML_MAX_NAME`).
pub const MAX_TENSOR_NAME_LEN: u64 = 63;

/// Bounds on what a header may declare. Everything beyond them is refused before it is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_tensors: u64,
    pub max_kv: u64,
    /// Longest key or string value, in bytes.
    pub max_string_len: u64,
    /// Most elements in one metadata array.
    pub max_array_len: u64,
    /// Longest `tokenizer.chat_template` (or `tokenizer.chat_template.*`), in bytes.
    pub max_chat_template_len: u64,
    /// Most dimensions of one tensor (ggml has 4).
    pub max_dims: u32,
    /// Values of `general.architecture` that are accepted, compared exactly.
    pub allowed_architectures: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        const ARCHITECTURES: &[&str] = &[
            "llama",
            "gemma",
            "gemma2",
            "gemma3",
            "qwen2",
            "qwen3",
            "qwen2moe",
            "qwen3moe",
            "mistral",
            "mistral3",
            "phi2",
            "phi3",
            "granite",
            "falcon",
            "starcoder2",
            "olmo",
            "olmo2",
            "deepseek2",
            "command-r",
            "cohere2",
            "gpt-oss",
            "glm4",
        ];
        Self {
            max_tensors: 65_536,
            max_kv: 65_536,
            max_string_len: 1024 * 1024,
            // Tokenizer vocabularies run to ~260k entries and BPE merges to ~500k.
            max_array_len: 16 * 1024 * 1024,
            max_chat_template_len: 64 * 1024,
            max_dims: 4,
            allowed_architectures: ARCHITECTURES.iter().map(|a| a.to_string()).collect(),
        }
    }
}

/// Why a GGUF file was refused. Offsets are byte offsets from the start of the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("not a GGUF file: magic is {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: [u8; 4] },
    #[error("big-endian GGUF files are not supported (version field reads {version:#010x})")]
    BigEndian { version: u32 },
    #[error("GGUF version {0} is not supported (only 2 and 3)")]
    UnsupportedVersion(u32),
    #[error("truncated GGUF: {what} at offset {offset} runs past the end of the file")]
    Truncated { what: String, offset: u64 },
    #[error("too many {what}: {count} declared, at most {limit} allowed")]
    TooMany {
        what: String,
        count: u64,
        limit: u64,
    },
    #[error("{what} at offset {offset} is {len} bytes long, at most {limit} allowed")]
    StringTooLong {
        what: String,
        offset: u64,
        len: u64,
        limit: u64,
    },
    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: u64 },
    #[error("metadata key `{key}` has unknown value type {type_id}")]
    BadValueType { key: String, type_id: u32 },
    #[error("metadata key `{key}` is an array of arrays, which is not supported")]
    NestedArray { key: String },
    #[error("metadata key `{key}` should be {expected} but is {found}")]
    WrongValueType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("metadata key `{0}` appears more than once")]
    DuplicateKey(String),
    #[error("general.alignment is {0}; it must be a power of two no larger than 1 MiB")]
    BadAlignment(u64),
    #[error("general.architecture is missing")]
    MissingArchitecture,
    #[error("architecture `{0}` is not in the allow-list")]
    ArchitectureNotAllowed(String),
    #[error("chat template `{key}` is {len} bytes long, at most {limit} allowed")]
    ChatTemplateTooLarge { key: String, len: u64, limit: u64 },
    #[error("tensor `{0}` appears more than once")]
    DuplicateTensor(String),
    #[error("tensor `{tensor}` has unknown ggml type {type_id}")]
    UnknownTensorType { tensor: String, type_id: u32 },
    #[error("tensor `{tensor}` has bad dimensions {dims:?}: {reason}")]
    BadDimensions {
        tensor: String,
        dims: Vec<u64>,
        reason: String,
    },
    #[error("tensor `{tensor}`: element count or byte size of dimensions {dims:?} overflows")]
    SizeOverflow { tensor: String, dims: Vec<u64> },
    #[error("tensor `{tensor}` has offset {offset}, not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error(
        "tensor `{tensor}` data (offset {offset} + {size} bytes after the data section at \
         {data_start}) lies outside the file of {file_len} bytes"
    )]
    TensorOutOfBounds {
        tensor: String,
        data_start: u64,
        offset: u64,
        size: u64,
        file_len: u64,
    },
    #[error("tensors `{a}` and `{b}` overlap")]
    OverlappingTensors { a: String, b: String },
    #[error("reading the GGUF file: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads and validates the header of the GGUF file at `path` (reads only the header and checks
/// tensor ranges against the file length; never reads tensor data).
pub fn inspect_file(path: &Path, limits: &Limits) -> Result<GgufFacts, GgufError> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    // Large reads: a model's metadata (a 262k-token vocabulary is megabytes of short strings)
    // was just written with O_DIRECT, so it comes from the disk, not the page cache.
    inspect(BufReader::with_capacity(1 << 20, file), len, limits)
}

/// Same as [`inspect_file`] over any buffered reader positioned at the start of the file (a
/// byte slice, a `BufReader`, chunks as they stream in), with the file's total length. A
/// reader that ends before `total_len` is treated as a truncated file. Strings are checked
/// in the reader's buffer where they lie whole in it, so a larger buffer parses faster.
pub fn inspect(
    reader: impl std::io::BufRead,
    total_len: u64,
    limits: &Limits,
) -> Result<GgufFacts, GgufError> {
    let header = reader::read_header(reader, total_len, limits)?;
    facts::facts_from_header(&header)
}
