//! The structural pass: reads the header byte by byte, bounding everything before it is read,
//! and returns what the facts are taken from.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{self, BufRead};

use super::types::{GgmlType, value_type};
use super::{DEFAULT_ALIGNMENT, GgufError, Limits, MAX_ALIGNMENT, MAX_TENSOR_NAME_LEN};

/// A metadata value as kept after reading. Arrays are validated element by element but only
/// their shape is kept: nothing the facts need is an array.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Value {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array { elem_type: u32, len: u64 },
}

/// One metadata pair's value with the type id it was stored as.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Entry {
    pub type_id: u32,
    pub value: Value,
}

impl Entry {
    /// The stored type for messages: `u32`, `string`, `array of f32`, ...
    pub fn type_description(&self) -> String {
        match self.value {
            Value::Array { elem_type, .. } => {
                format!("array of {}", value_type::name(elem_type))
            }
            _ => value_type::name(self.type_id).to_string(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct TensorInfo {
    pub name: String,
    pub ty: GgmlType,
    /// Relative to the start of the data section.
    pub offset: u64,
    pub elements: u64,
    pub bytes: u64,
}

/// A header that passed every structural check.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Header {
    pub version: u32,
    pub architecture: String,
    pub entries: HashMap<String, Entry>,
    pub tensors: Vec<TensorInfo>,
}

/// What was being read, for messages. Rendered only when an error is built.
#[derive(Clone, Copy)]
enum Item<'a> {
    Magic,
    Version,
    TensorCount,
    KvCount,
    Key { index: u64 },
    ValueType { key: &'a str },
    Value { key: &'a str },
    ArrayElement { key: &'a str, index: u64 },
    TensorName { index: u64 },
    TensorInfo { name: &'a str },
    Padding,
}

impl fmt::Display for Item<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Item::Magic => f.write_str("the magic"),
            Item::Version => f.write_str("the version"),
            Item::TensorCount => f.write_str("the tensor count"),
            Item::KvCount => f.write_str("the metadata count"),
            Item::Key { index } => write!(f, "the key of metadata pair {index}"),
            Item::ValueType { key } => write!(f, "the value type of `{key}`"),
            Item::Value { key } => write!(f, "the value of `{key}`"),
            Item::ArrayElement { key, index } => write!(f, "element {index} of `{key}`"),
            Item::TensorName { index } => write!(f, "the name of tensor {index}"),
            Item::TensorInfo { name } => write!(f, "the info of tensor `{name}`"),
            Item::Padding => f.write_str("the padding before the tensor data"),
        }
    }
}

/// The reader with its position and the file's length, so that every read is checked against
/// what is left before it is attempted.
struct Source<R> {
    inner: R,
    offset: u64,
    total_len: u64,
    /// Reused for strings that are validated but not kept (array elements).
    scratch: Vec<u8>,
}

impl<R: BufRead> Source<R> {
    fn remaining(&self) -> u64 {
        self.total_len.saturating_sub(self.offset)
    }

    fn truncated(&self, what: Item<'_>) -> GgufError {
        GgufError::Truncated {
            what: what.to_string(),
            offset: self.offset,
        }
    }

    fn ensure(&self, n: u64, what: Item<'_>) -> Result<(), GgufError> {
        if n > self.remaining() {
            return Err(self.truncated(what));
        }
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8], what: Item<'_>) -> Result<(), GgufError> {
        self.ensure(buf.len() as u64, what)?;
        match self.inner.read_exact(buf) {
            Ok(()) => {}
            // The reader ended before the length we were told.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(self.truncated(what)),
            Err(e) => return Err(GgufError::Io(e)),
        }
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: Item<'_>) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    fn u32(&mut self, what: Item<'_>) -> Result<u32, GgufError> {
        self.bytes(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: Item<'_>) -> Result<u64, GgufError> {
        self.bytes(what).map(u64::from_le_bytes)
    }

    /// The bytes in the reader's buffer, read in first if it is empty; empty at the end.
    fn buffered(&mut self) -> Result<&[u8], GgufError> {
        loop {
            match self.inner.fill_buf() {
                // Asked again to return it: returning the first answer from inside the loop
                // does not borrow-check. With bytes buffered the second call reads nothing.
                Ok(_) => return Ok(self.inner.fill_buf()?),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(GgufError::Io(e)),
            }
        }
    }

    /// Steps over `n` bytes in the reader's buffer, without copying them anywhere.
    fn skip(&mut self, n: u64, what: Item<'_>) -> Result<(), GgufError> {
        self.ensure(n, what)?;
        let mut left = n;
        while left > 0 {
            let available = self.buffered()?.len();
            if available == 0 {
                self.offset += n - left;
                return Err(self.truncated(what));
            }
            let take = left.min(available as u64);
            // `take` is at most `available`, a `usize`.
            self.inner.consume(take as usize);
            left -= take;
        }
        self.offset += n;
        Ok(())
    }

    /// Reads a string's length and checks it against `limit`; returns it with its offset.
    fn string_len(&mut self, limit: u64, what: Item<'_>) -> Result<(u64, u64), GgufError> {
        let at = self.offset;
        let len = self.u64(what)?;
        if len > limit {
            return Err(GgufError::StringTooLong {
                what: what.to_string(),
                offset: at,
                len,
                limit,
            });
        }
        Ok((at, len))
    }

    /// Reads `len` string bytes into the scratch buffer and checks they are UTF-8.
    fn string_body(&mut self, at: u64, len: u64, what: Item<'_>) -> Result<&str, GgufError> {
        self.ensure(len, what)?;
        // `len` is below the caller's limit and the bytes left in the file.
        let len = usize::try_from(len).map_err(|_| self.truncated(what))?;
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        buf.resize(len, 0);
        let filled = self.fill(&mut buf, what);
        self.scratch = buf;
        filled?;
        std::str::from_utf8(&self.scratch).map_err(|_| GgufError::InvalidUtf8 {
            what: what.to_string(),
            offset: at,
        })
    }

    /// Checks up to `count` string array elements that lie whole in the reader's buffer,
    /// straight from the buffer: a vocabulary is hundreds of thousands of short strings, and
    /// reading each one's length and bytes separately cost more than the rest of the
    /// pre-parse. Stops early, leaving the element for [`Self::string_len`] and
    /// [`Self::string_body`] to read (and report, if it is bad), at the buffer's end and at
    /// an element that is too long, past the file's announced length or not UTF-8. Returns
    /// how many elements it checked.
    fn buffered_strings(&mut self, count: u64, limit: u64) -> Result<u64, GgufError> {
        let left_in_file = self.remaining();
        let buf = self.buffered()?;
        let (mut pos, mut checked) = (0usize, 0u64);
        while checked < count {
            let Some(len) = buf.get(pos..pos + 8) else {
                break;
            };
            let len = u64::from_le_bytes(len.try_into().expect("eight bytes"));
            if len > limit {
                break;
            }
            let end = (pos as u64 + 8).saturating_add(len);
            if end > buf.len() as u64 || end > left_in_file {
                break;
            }
            // Within the buffer, so it fits a `usize`.
            let end = end as usize;
            if std::str::from_utf8(&buf[pos + 8..end]).is_err() {
                break;
            }
            pos = end;
            checked += 1;
        }
        self.inner.consume(pos);
        self.offset += pos as u64;
        Ok(checked)
    }

    fn string(&mut self, limit: u64, what: Item<'_>) -> Result<String, GgufError> {
        let (at, len) = self.string_len(limit, what)?;
        self.string_body(at, len, what).map(str::to_owned)
    }
}

/// `tokenizer.chat_template` and its named variants (`tokenizer.chat_template.tool_use`, ...).
pub(super) fn is_chat_template(key: &str) -> bool {
    key == "tokenizer.chat_template" || key.starts_with("tokenizer.chat_template.")
}

pub(super) fn read_header(
    reader: impl BufRead,
    total_len: u64,
    limits: &Limits,
) -> Result<Header, GgufError> {
    let mut src = Source {
        inner: reader,
        offset: 0,
        total_len,
        scratch: Vec::new(),
    };

    let magic: [u8; 4] = src.bytes(Item::Magic)?;
    if &magic != b"GGUF" {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = src.u32(Item::Version)?;
    match version {
        2 | 3 => {}
        v if matches!(v.swap_bytes(), 1..=3) => return Err(GgufError::BigEndian { version: v }),
        v => return Err(GgufError::UnsupportedVersion(v)),
    }

    let tensor_count = src.u64(Item::TensorCount)?;
    check_count("tensors", tensor_count, limits.max_tensors)?;
    let kv_count = src.u64(Item::KvCount)?;
    check_count("metadata key-value pairs", kv_count, limits.max_kv)?;

    let mut entries: HashMap<String, Entry> = HashMap::new();
    for index in 0..kv_count {
        let key = src.string(limits.max_string_len, Item::Key { index })?;
        if entries.contains_key(&key) {
            return Err(GgufError::DuplicateKey(key));
        }
        let type_id = src.u32(Item::ValueType { key: &key })?;
        let value = read_value(&mut src, &key, type_id, limits)?;
        entries.insert(key, Entry { type_id, value });
    }

    let alignment = alignment(&entries)?;
    let architecture = match entries.get("general.architecture") {
        None => return Err(GgufError::MissingArchitecture),
        Some(Entry {
            value: Value::Str(arch),
            ..
        }) => arch.clone(),
        Some(other) => {
            return Err(GgufError::WrongValueType {
                key: "general.architecture".into(),
                expected: "a string",
                found: other.type_description(),
            });
        }
    };
    if !limits.allowed_architectures.contains(&architecture) {
        return Err(GgufError::ArchitectureNotAllowed(architecture));
    }

    // The count was bounded above; the vector still grows only as infos are actually read.
    let mut tensors = Vec::with_capacity(usize::try_from(tensor_count.min(1024)).unwrap_or(0));
    let mut names = HashSet::new();
    let name_limit = limits.max_string_len.min(MAX_TENSOR_NAME_LEN);
    for index in 0..tensor_count {
        let name = src.string(name_limit, Item::TensorName { index })?;
        if !names.insert(name.clone()) {
            return Err(GgufError::DuplicateTensor(name));
        }
        tensors.push(read_tensor_info(&mut src, name, alignment, limits)?);
    }

    // The data section starts at the next multiple of the alignment; the padding must be there
    // even when no tensor follows, as every GGUF writer puts it there.
    let header_end = src.offset;
    let data_start = header_end
        .checked_next_multiple_of(alignment)
        .filter(|&start| start <= total_len)
        .ok_or_else(|| src.truncated(Item::Padding))?;

    for t in &tensors {
        let end = data_start
            .checked_add(t.offset)
            .and_then(|start| start.checked_add(t.bytes));
        if end.is_none_or(|end| end > total_len) {
            return Err(GgufError::TensorOutOfBounds {
                tensor: t.name.clone(),
                data_start,
                offset: t.offset,
                size: t.bytes,
                file_len: total_len,
            });
        }
    }

    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        // In bounds, so the sum cannot overflow.
        if a.offset.saturating_add(a.bytes) > b.offset {
            return Err(GgufError::OverlappingTensors {
                a: a.name.clone(),
                b: b.name.clone(),
            });
        }
    }

    Ok(Header {
        version,
        architecture,
        entries,
        tensors,
    })
}

fn check_count(what: &str, count: u64, limit: u64) -> Result<(), GgufError> {
    if count > limit {
        return Err(GgufError::TooMany {
            what: what.to_string(),
            count,
            limit,
        });
    }
    Ok(())
}

fn alignment(entries: &HashMap<String, Entry>) -> Result<u64, GgufError> {
    let Some(entry) = entries.get("general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match (entry.type_id, &entry.value) {
        (value_type::U32, &Value::Uint(a)) => {
            if a.is_power_of_two() && a <= MAX_ALIGNMENT {
                Ok(a)
            } else {
                Err(GgufError::BadAlignment(a))
            }
        }
        _ => Err(GgufError::WrongValueType {
            key: "general.alignment".into(),
            expected: "a u32",
            found: entry.type_description(),
        }),
    }
}

fn read_value<R: BufRead>(
    src: &mut Source<R>,
    key: &str,
    type_id: u32,
    limits: &Limits,
) -> Result<Value, GgufError> {
    let what = Item::Value { key };
    let chat_template = is_chat_template(key);
    let known = value_type::fixed_size(type_id).is_some()
        || matches!(type_id, value_type::STRING | value_type::ARRAY);
    if chat_template && known && type_id != value_type::STRING {
        return Err(GgufError::WrongValueType {
            key: key.into(),
            expected: "a string",
            found: value_type::name(type_id).into(),
        });
    }
    Ok(match type_id {
        value_type::U8 => Value::Uint(u8::from_le_bytes(src.bytes(what)?).into()),
        value_type::I8 => Value::Int(i8::from_le_bytes(src.bytes(what)?).into()),
        value_type::U16 => Value::Uint(u16::from_le_bytes(src.bytes(what)?).into()),
        value_type::I16 => Value::Int(i16::from_le_bytes(src.bytes(what)?).into()),
        value_type::U32 => Value::Uint(src.u32(what)?.into()),
        value_type::I32 => Value::Int(i32::from_le_bytes(src.bytes(what)?).into()),
        value_type::F32 => Value::Float(f32::from_le_bytes(src.bytes(what)?).into()),
        value_type::BOOL => Value::Bool(src.bytes::<1>(what)?[0] != 0),
        value_type::STRING => {
            let at = src.offset;
            let len = u64::from_le_bytes(src.bytes(what)?);
            if chat_template && len > limits.max_chat_template_len {
                return Err(GgufError::ChatTemplateTooLarge {
                    key: key.into(),
                    len,
                    limit: limits.max_chat_template_len,
                });
            }
            if len > limits.max_string_len {
                return Err(GgufError::StringTooLong {
                    what: what.to_string(),
                    offset: at,
                    len,
                    limit: limits.max_string_len,
                });
            }
            Value::Str(src.string_body(at, len, what)?.to_owned())
        }
        value_type::ARRAY => read_array(src, key, limits)?,
        value_type::U64 => Value::Uint(src.u64(what)?),
        value_type::I64 => Value::Int(i64::from_le_bytes(src.bytes(what)?)),
        value_type::F64 => Value::Float(f64::from_le_bytes(src.bytes(what)?)),
        _ => {
            return Err(GgufError::BadValueType {
                key: key.into(),
                type_id,
            });
        }
    })
}

fn read_array<R: BufRead>(
    src: &mut Source<R>,
    key: &str,
    limits: &Limits,
) -> Result<Value, GgufError> {
    let what = Item::Value { key };
    let elem_type = src.u32(what)?;
    if elem_type == value_type::ARRAY {
        return Err(GgufError::NestedArray { key: key.into() });
    }
    let elem_size = value_type::fixed_size(elem_type);
    if elem_size.is_none() && elem_type != value_type::STRING {
        return Err(GgufError::BadValueType {
            key: key.into(),
            type_id: elem_type,
        });
    }
    let len = src.u64(what)?;
    if len > limits.max_array_len {
        return Err(GgufError::TooMany {
            what: format!("elements in array `{key}`"),
            count: len,
            limit: limits.max_array_len,
        });
    }
    match elem_size {
        Some(size) => {
            let total = len.checked_mul(size).ok_or_else(|| src.truncated(what))?;
            src.skip(total, what)?;
        }
        None => {
            // Each element is at least its 8-byte length: refuse a count the file cannot hold
            // before looping over it.
            src.ensure(len.saturating_mul(8), what)?;
            let mut index = 0;
            while index < len {
                index += src.buffered_strings(len - index, limits.max_string_len)?;
                if index == len {
                    break;
                }
                // An element across the end of the buffer, or one to refuse.
                let item = Item::ArrayElement { key, index };
                let (at, n) = src.string_len(limits.max_string_len, item)?;
                src.string_body(at, n, item)?;
                index += 1;
            }
        }
    }
    Ok(Value::Array { elem_type, len })
}

fn read_tensor_info<R: BufRead>(
    src: &mut Source<R>,
    name: String,
    alignment: u64,
    limits: &Limits,
) -> Result<TensorInfo, GgufError> {
    let what = Item::TensorInfo { name: &name };
    let n_dims = src.u32(what)?;
    if n_dims == 0 || n_dims > limits.max_dims {
        return Err(GgufError::BadDimensions {
            tensor: name,
            dims: Vec::new(),
            reason: format!("{n_dims} dimensions, expected 1 to {}", limits.max_dims),
        });
    }
    let mut dims = Vec::with_capacity(n_dims.min(16) as usize);
    for _ in 0..n_dims {
        dims.push(src.u64(what)?);
    }
    let type_id = src.u32(what)?;
    let offset = src.u64(what)?;

    if dims.contains(&0) {
        return Err(GgufError::BadDimensions {
            tensor: name,
            dims,
            reason: "a dimension is zero".into(),
        });
    }
    let Some(ty) = GgmlType::from_id(type_id) else {
        return Err(GgufError::UnknownTensorType {
            tensor: name,
            type_id,
        });
    };
    // ggml counts elements in int64_t.
    let elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| i64::try_from(n).is_ok());
    let Some(elements) = elements else {
        return Err(GgufError::SizeOverflow { tensor: name, dims });
    };
    // ggml's rule: rows are whole blocks. It implies the element count is whole blocks too.
    if dims[0] % ty.block_size() != 0 {
        let reason = format!(
            "the first dimension is not a multiple of {ty}'s block size {}",
            ty.block_size()
        );
        return Err(GgufError::BadDimensions {
            tensor: name,
            dims,
            reason,
        });
    }
    let Some(bytes) = (elements / ty.block_size()).checked_mul(ty.type_size()) else {
        return Err(GgufError::SizeOverflow { tensor: name, dims });
    };
    if offset % alignment != 0 {
        return Err(GgufError::MisalignedTensor {
            tensor: name,
            offset,
            alignment,
        });
    }
    Ok(TensorInfo {
        name,
        ty,
        offset,
        elements,
        bytes,
    })
}
