//! The GGUF reader against files built by the writer: a valid one and what it says, and a
//! corpus of malformed ones, each made from a valid file by one documented change and each
//! refused with the right error.
//!
//! The fuzz seeds in `fuzz/corpus/gguf_inspect/seed-*` are a few of these files; a test below
//! checks they are byte for byte what the generator here writes and are judged as their names
//! say. Regenerate them with `STEWARD_WRITE_FUZZ_SEEDS=1 cargo test -p steward-artifact --test
//! gguf_corpus`.

use std::path::{Path, PathBuf};

use steward_artifact::gguf::writer::GgufWriter;
use steward_artifact::gguf::{
    GgmlType, GgufError, GgufFacts, LOAD_OVERHEAD_BYTES, Limits, inspect, inspect_file, value_type,
};

fn check(bytes: &[u8]) -> Result<GgufFacts, GgufError> {
    inspect(bytes, bytes.len() as u64, &Limits::default())
}

/// Asserts that `bytes` is refused with an error matching the pattern, showing it otherwise.
macro_rules! assert_refused {
    ($bytes:expr, $pattern:pat $(if $guard:expr)?) => {{
        let result = check(&$bytes);
        match &result {
            Err($pattern) $(if $guard)? => {}
            other => panic!("expected {}, got {other:?}", stringify!($pattern)),
        }
        result.unwrap_err()
    }};
}

// ---------------------------------------------------------------------------------------------
// The valid base and byte surgery on it.

/// A small llama-like model: two F32/F16 tensors and a Q4_K one, a tokenizer, a template.
/// The last tensor's data (288 bytes) is a multiple of the alignment, so the file ends exactly
/// where the last tensor does and every shorter prefix is missing something.
fn tiny_llama() -> GgufWriter {
    GgufWriter::new(3)
        .kv_string("general.architecture", "llama")
        .kv_string("general.name", "tiny")
        .kv_u32("llama.context_length", 2048)
        .kv_u32("llama.block_count", 2)
        .kv_u32("llama.embedding_length", 64)
        .kv_u32("llama.attention.head_count", 4)
        .kv_u32("llama.attention.head_count_kv", 2)
        .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .kv_string("tokenizer.ggml.model", "llama")
        .kv_string_array("tokenizer.ggml.tokens", &["<unk>", "<s>", "</s>", "a"])
        .kv_f32_array("tokenizer.ggml.scores", &[0.0; 4])
        .kv_i32_array("tokenizer.ggml.token_type", &[2, 3, 3, 1])
        .kv_bool("tokenizer.ggml.add_bos_token", true)
        .kv_string(
            "tokenizer.chat_template",
            "{% for m in messages %}{{ m.content }}{% endfor %}",
        )
        .tensor_f32("token_embd.weight", &[64, 4], &[0.5; 256])
        .tensor_f16("output_norm.weight", &[64], &[1.0; 64])
        .tensor_raw(
            "blk.0.attn_q.weight",
            &[256, 2],
            GgmlType::Q4_K,
            vec![0u8; 288],
        )
}

fn tiny_llama_bytes() -> Vec<u8> {
    tiny_llama().to_bytes()
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{:?} not found", String::from_utf8_lossy(needle)))
}

/// Where a GGUF string (u64 length + bytes) holding `s` starts.
fn string_at(bytes: &[u8], s: &str) -> usize {
    let mut encoded = (s.len() as u64).to_le_bytes().to_vec();
    encoded.extend_from_slice(s.as_bytes());
    find(bytes, &encoded)
}

/// Where the value type of metadata key `key` is (its value follows 4 bytes later).
fn value_type_at(bytes: &[u8], key: &str) -> usize {
    string_at(bytes, key) + 8 + key.len()
}

/// Where the `offset` field of tensor `name`'s info is.
fn tensor_offset_at(bytes: &[u8], name: &str) -> usize {
    let dims_at = string_at(bytes, name) + 8 + name.len();
    let n_dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().unwrap()) as usize;
    dims_at + 4 + 8 * n_dims + 4
}

fn put_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// The base with one byte-level change.
fn patched(change: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut bytes = tiny_llama_bytes();
    change(&mut bytes);
    bytes
}

/// A file with the base's architecture plus the given metadata and tensors.
fn minimal() -> GgufWriter {
    GgufWriter::new(3).kv_string("general.architecture", "llama")
}

// ---------------------------------------------------------------------------------------------
// The malformed corpus. Each function documents the one thing it breaks.

/// "GGML" where "GGUF" should be.
fn wrong_magic() -> Vec<u8> {
    patched(|b| b[0..4].copy_from_slice(b"GGML"))
}

/// Version 1 (u32 counts, never supported by llama.cpp any more).
fn version_1() -> Vec<u8> {
    patched(|b| put_u32(b, 4, 1))
}

/// Version 3 stored big-endian.
fn big_endian() -> Vec<u8> {
    patched(|b| b[4..8].copy_from_slice(&3u32.to_be_bytes()))
}

/// A tensor count of u64::MAX.
fn huge_tensor_count() -> Vec<u8> {
    patched(|b| put_u64(b, 8, u64::MAX))
}

/// A metadata count of u64::MAX.
fn huge_kv_count() -> Vec<u8> {
    patched(|b| put_u64(b, 16, u64::MAX))
}

/// The first key claims to be u64::MAX bytes long.
fn huge_key_length() -> Vec<u8> {
    patched(|b| put_u64(b, 24, u64::MAX))
}

/// `general.name`'s value claims to be 2 GiB long.
fn huge_string_value() -> Vec<u8> {
    patched(|b| {
        let at = value_type_at(b, "general.name") + 4;
        put_u64(b, at, 2 << 30);
    })
}

/// The token array claims u64::MAX elements.
fn huge_array_length() -> Vec<u8> {
    patched(|b| {
        let at = value_type_at(b, "tokenizer.ggml.tokens") + 4 + 4;
        put_u64(b, at, u64::MAX);
    })
}

/// The last tensor's offset points 1 TiB into a 2 KiB file.
fn tensor_offset_out_of_range() -> Vec<u8> {
    patched(|b| {
        let at = tensor_offset_at(b, "blk.0.attn_q.weight");
        put_u64(b, at, 1 << 40);
    })
}

/// The last tensor's offset is aligned but so large that offset + size overflows u64.
fn tensor_offset_overflowing() -> Vec<u8> {
    patched(|b| {
        let at = tensor_offset_at(b, "blk.0.attn_q.weight");
        put_u64(b, at, !31u64);
    })
}

/// `output_norm.weight` moved from 1024 to 992, into the last 32 bytes of `token_embd.weight`.
fn overlapping_tensors() -> Vec<u8> {
    patched(|b| {
        let at = tensor_offset_at(b, "output_norm.weight");
        put_u64(b, at, 992);
    })
}

/// `output_norm.weight` moved from 1024 to 1025, off the 32-byte alignment.
fn misaligned_tensor() -> Vec<u8> {
    patched(|b| {
        let at = tensor_offset_at(b, "output_norm.weight");
        put_u64(b, at, 1025);
    })
}

/// A tensor of ggml type 4 (Q4_2, withdrawn long ago).
fn unknown_tensor_type() -> Vec<u8> {
    minimal()
        .tensor_raw("t", &[32], 4u32, vec![0u8; 32])
        .to_bytes()
}

/// `llama.context_length` stored with value type 13, which does not exist.
fn bad_value_type() -> Vec<u8> {
    patched(|b| {
        let at = value_type_at(b, "llama.context_length");
        put_u32(b, at, 13);
    })
}

/// The token type array's element type changed to 13.
fn bad_array_element_type() -> Vec<u8> {
    patched(|b| {
        let at = value_type_at(b, "tokenizer.ggml.token_type") + 4;
        put_u32(b, at, 13);
    })
}

/// An array whose elements are arrays (of one u8 each).
fn nested_array() -> Vec<u8> {
    let mut value = Vec::new();
    value.extend_from_slice(&value_type::ARRAY.to_le_bytes());
    value.extend_from_slice(&1u64.to_le_bytes());
    value.extend_from_slice(&value_type::U8.to_le_bytes());
    value.extend_from_slice(&1u64.to_le_bytes());
    value.push(7);
    minimal()
        .kv_raw("nested", value_type::ARRAY, value)
        .to_bytes()
}

/// `general.name` twice.
fn duplicate_key() -> Vec<u8> {
    minimal()
        .kv_string("general.name", "a")
        .kv_string("general.name", "b")
        .to_bytes()
}

/// Two tensors called `t`.
fn duplicate_tensor() -> Vec<u8> {
    minimal()
        .tensor_f32("t", &[8], &[0.0; 8])
        .tensor_f32("t", &[8], &[0.0; 8])
        .to_bytes()
}

/// `general.architecture` is "gpt2", which the default allow-list does not have.
fn disallowed_architecture() -> Vec<u8> {
    GgufWriter::new(3)
        .kv_string("general.architecture", "gpt2")
        .to_bytes()
}

/// No `general.architecture` at all.
fn missing_architecture() -> Vec<u8> {
    GgufWriter::new(3)
        .kv_string("general.name", "x")
        .tensor_f32("t", &[8], &[0.0; 8])
        .to_bytes()
}

/// A chat template one byte over 64 KiB.
fn oversized_chat_template() -> Vec<u8> {
    minimal()
        .kv_string("tokenizer.chat_template", &"x".repeat(64 * 1024 + 1))
        .to_bytes()
}

/// A named chat template variant one byte over 64 KiB.
fn oversized_named_chat_template() -> Vec<u8> {
    minimal()
        .kv_string("tokenizer.chat_template", "{{ x }}")
        .kv_string(
            "tokenizer.chat_template.tool_use",
            &"x".repeat(64 * 1024 + 1),
        )
        .to_bytes()
}

/// `general.alignment` = 48, not a power of two.
fn alignment_not_power_of_two() -> Vec<u8> {
    minimal().kv_u32("general.alignment", 48).to_bytes()
}

/// `general.alignment` = 0.
fn alignment_zero() -> Vec<u8> {
    minimal().kv_u32("general.alignment", 0).to_bytes()
}

/// `general.alignment` = 2 MiB, over the 1 MiB cap.
fn alignment_too_large() -> Vec<u8> {
    minimal().kv_u32("general.alignment", 2 << 20).to_bytes()
}

/// `general.alignment` stored as a u64 (the spec says u32).
fn alignment_wrong_type() -> Vec<u8> {
    minimal().kv_u64("general.alignment", 32).to_bytes()
}

/// A tensor with dimensions [0, 4].
fn zero_dim() -> Vec<u8> {
    minimal()
        .tensor_raw("t", &[0, 4], GgmlType::F32, vec![])
        .to_bytes()
}

/// A tensor with 5 dimensions (ggml has 4).
fn too_many_dims() -> Vec<u8> {
    minimal()
        .tensor_f32("t", &[1, 1, 1, 1, 2], &[0.0; 2])
        .to_bytes()
}

/// A tensor with n_dims = 0.
fn no_dims() -> Vec<u8> {
    minimal()
        .tensor_raw("t", &[], GgmlType::F32, vec![])
        .to_bytes()
}

/// Dimensions whose element count overflows u64: 2^32 * 2^32 * 2^32.
fn element_count_overflow() -> Vec<u8> {
    minimal()
        .tensor_raw("t", &[1 << 32, 1 << 32, 1 << 32], GgmlType::F32, vec![])
        .to_bytes()
}

/// Dimensions whose element count (2^63) is past ggml's int64_t.
fn element_count_past_i64() -> Vec<u8> {
    minimal()
        .tensor_raw("t", &[1 << 32, 1 << 31], GgmlType::I8, vec![])
        .to_bytes()
}

/// 2^62 F32 elements: the count fits, the byte size (2^64) does not.
fn byte_size_overflow() -> Vec<u8> {
    minimal()
        .tensor_raw("t", &[1 << 31, 1 << 31], GgmlType::F32, vec![])
        .to_bytes()
}

/// A Q4_0 tensor whose rows (31 elements) are not whole 32-element blocks.
fn partial_block() -> Vec<u8> {
    minimal()
        .tensor_raw("t", &[31, 32], GgmlType::Q4_0, vec![0u8; 31 * 18])
        .to_bytes()
}

/// A key holding the byte 0xff, which is not UTF-8.
fn invalid_utf8_key() -> Vec<u8> {
    let mut bytes = minimal().kv_u32("bad.key", 1).to_bytes();
    let at = string_at(&bytes, "bad.key") + 8;
    bytes[at] = 0xff;
    bytes
}

/// A string value holding 0xc3 0x28, an invalid two-byte sequence.
fn invalid_utf8_value() -> Vec<u8> {
    let mut bytes = minimal().kv_string("general.name", "ab").to_bytes();
    let at = string_at(&bytes, "ab") + 8;
    bytes[at..at + 2].copy_from_slice(&[0xc3, 0x28]);
    bytes
}

/// A token (array element 2) holding a lone continuation byte.
fn invalid_utf8_array_element() -> Vec<u8> {
    patched(|b| {
        let at = string_at(b, "</s>") + 8;
        b[at] = 0x80;
    })
}

/// A tensor name of 64 bytes; ggml keeps at most 63.
fn tensor_name_too_long() -> Vec<u8> {
    minimal()
        .tensor_f32(&"n".repeat(64), &[8], &[0.0; 8])
        .to_bytes()
}

/// `general.architecture` stored as a u32.
fn architecture_not_a_string() -> Vec<u8> {
    GgufWriter::new(3)
        .kv_u32("general.architecture", 1)
        .to_bytes()
}

/// The base cut off in the middle of its tensor infos.
fn truncated_in_tensor_infos() -> Vec<u8> {
    let mut bytes = tiny_llama_bytes();
    let at = tensor_offset_at(&bytes, "output_norm.weight");
    bytes.truncate(at + 3);
    bytes
}

// ---------------------------------------------------------------------------------------------
// The valid file.

#[test]
fn a_valid_file_written_by_the_writer_inspects_to_the_right_facts() {
    let facts = check(&tiny_llama_bytes()).unwrap();
    let tensor_bytes = 64 * 4 * 4 + 64 * 2 + 2 * 144;
    assert_eq!(
        facts,
        GgufFacts {
            version: 3,
            architecture: "llama".into(),
            name: Some("tiny".into()),
            parameter_count: 64 * 4 + 64 + 256 * 2,
            // No general.file_type: the type with the most elements.
            quantization: "Q4_K".into(),
            context_length: Some(2048),
            block_count: Some(2),
            embedding_length: Some(64),
            head_count: Some(4),
            head_count_kv: Some(2),
            tensor_count: 3,
            tensor_data_bytes: tensor_bytes,
            has_chat_template: true,
            estimated_load_bytes: tensor_bytes + LOAD_OVERHEAD_BYTES,
        }
    );
    // 2 (K, V) * 2 layers * 1000 tokens * 2 kv heads * (64 / 4) head dim * 2 bytes.
    assert_eq!(facts.kv_cache_bytes(1000), Some(2 * 2 * 1000 * 2 * 16 * 2));
}

#[test]
fn quantization_is_named_from_general_file_type_when_present() {
    let bytes = tiny_llama().kv_u32("general.file_type", 15).to_bytes();
    assert_eq!(check(&bytes).unwrap().quantization, "Q4_K_M");
    // An unknown file type falls back to the dominant tensor type.
    let bytes = tiny_llama().kv_u32("general.file_type", 999).to_bytes();
    assert_eq!(check(&bytes).unwrap().quantization, "Q4_K");
}

#[test]
fn a_file_without_tensors_or_optional_keys_has_empty_facts() {
    let facts = check(&minimal().to_bytes()).unwrap();
    assert_eq!(facts.parameter_count, 0);
    assert_eq!(facts.quantization, "unknown");
    assert_eq!(facts.name, None);
    assert_eq!(facts.context_length, None);
    assert!(!facts.has_chat_template);
    assert_eq!(facts.kv_cache_bytes(1024), None);
}

#[test]
fn version_2_and_a_larger_alignment_are_accepted() {
    let bytes = GgufWriter::new(2)
        .kv_string("general.architecture", "qwen2")
        .alignment(256)
        .tensor_f32("a", &[3], &[1.0, 2.0, 3.0])
        .tensor_f16("b", &[5], &[1.0; 5])
        .to_bytes();
    let facts = check(&bytes).unwrap();
    assert_eq!(facts.version, 2);
    assert_eq!(facts.architecture, "qwen2");
    assert_eq!(facts.tensor_data_bytes, 12 + 10);
    assert_eq!(facts.quantization, "F16");
}

#[test]
fn per_layer_head_counts_given_as_arrays_are_not_facts() {
    let bytes = minimal()
        .kv_u32("llama.attention.head_count", 8)
        .kv_i32_array("llama.attention.head_count_kv", &[2, 4])
        .to_bytes();
    let facts = check(&bytes).unwrap();
    assert_eq!(facts.head_count, Some(8));
    assert_eq!(facts.head_count_kv, None);
}

#[test]
fn every_tensor_type_with_whole_blocks_is_accepted_with_its_byte_size() {
    for &ty in GgmlType::ALL {
        let size = 2 * ty.type_size();
        let bytes = minimal()
            .tensor_raw("t", &[ty.block_size(), 2], ty, vec![0u8; size as usize])
            .to_bytes();
        let facts = check(&bytes).unwrap_or_else(|e| panic!("{ty}: {e}"));
        assert_eq!(facts.tensor_data_bytes, size, "{ty}");
        assert_eq!(facts.parameter_count, 2 * ty.block_size(), "{ty}");
    }
}

#[test]
fn inspect_file_reads_a_file_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny_llama().write_to(&path).unwrap();
    let facts = inspect_file(&path, &Limits::default()).unwrap();
    assert_eq!(facts.architecture, "llama");
    assert!(matches!(
        inspect_file(&dir.path().join("absent.gguf"), &Limits::default()),
        Err(GgufError::Io(_))
    ));
}

#[test]
fn limits_can_be_tightened_and_the_allow_list_replaced() {
    let bytes = tiny_llama_bytes();
    let limits = Limits {
        max_tensors: 2,
        ..Limits::default()
    };
    assert!(matches!(
        inspect(&bytes[..], bytes.len() as u64, &limits),
        Err(GgufError::TooMany {
            count: 3,
            limit: 2,
            ..
        })
    ));
    let limits = Limits {
        allowed_architectures: vec!["gemma3".into()],
        ..Limits::default()
    };
    assert!(matches!(
        inspect(&bytes[..], bytes.len() as u64, &limits),
        Err(GgufError::ArchitectureNotAllowed(a)) if a == "llama"
    ));
    let limits = Limits {
        max_array_len: 3,
        ..Limits::default()
    };
    assert!(matches!(
        inspect(&bytes[..], bytes.len() as u64, &limits),
        Err(GgufError::TooMany {
            count: 4,
            limit: 3,
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// Truncation.

/// The reader checks strings in place where they lie whole in its buffer and reads them
/// piece by piece where they straddle its end; either way a file gets the same verdict, the
/// same error at the same offset.
#[test]
fn every_verdict_is_the_same_whatever_the_reader_buffers() {
    let long_token = "t".repeat(300);
    let vocabulary: Vec<String> = (0..2000)
        .map(|i| match i % 3 {
            0 => format!("tok{i}"),
            1 => format!("é{i}ß"),
            _ => long_token.clone(),
        })
        .collect();
    let big_vocabulary = minimal()
        .kv_string_array("tokenizer.ggml.tokens", &vocabulary)
        .to_bytes();
    let bad_late_token = {
        let mut bytes = big_vocabulary.clone();
        let at = string_at(&bytes, "tok1500") + 8;
        bytes[at] = 0xff;
        bytes
    };
    let long_late_token = {
        let mut bytes = big_vocabulary.clone();
        let at = string_at(&bytes, "tok1899");
        put_u64(&mut bytes, at, 2 << 30);
        bytes
    };
    type Verdict = fn(&Result<GgufFacts, GgufError>) -> bool;
    let files: [(&str, Vec<u8>, Verdict); 9] = [
        ("tiny llama", tiny_llama_bytes(), |r| r.is_ok()),
        ("a 2000-token vocabulary", big_vocabulary.clone(), |r| {
            r.is_ok()
        }),
        (
            "token 1500 not UTF-8",
            bad_late_token.clone(),
            |r| matches!(r, Err(GgufError::InvalidUtf8 { what, .. }) if what.contains("element 1500 ")),
        ),
        (
            "token 1899 too long",
            long_late_token.clone(),
            |r| matches!(r, Err(GgufError::StringTooLong { what, .. }) if what.contains("element 1899 ")),
        ),
        (
            "the vocabulary cut short",
            big_vocabulary[..big_vocabulary.len() / 2].to_vec(),
            |r| matches!(r, Err(GgufError::Truncated { .. })),
        ),
        (
            "token 2 not UTF-8",
            invalid_utf8_array_element(),
            |r| matches!(r, Err(GgufError::InvalidUtf8 { what, .. }) if what.contains("element 2 ")),
        ),
        ("a huge array", huge_array_length(), |r| {
            matches!(r, Err(GgufError::TooMany { .. }))
        }),
        (
            "more tokens than the file holds",
            {
                patched(|b| {
                    let at = value_type_at(b, "tokenizer.ggml.tokens") + 8;
                    put_u64(b, at, 1_000_000);
                })
            },
            |r| matches!(r, Err(GgufError::Truncated { .. })),
        ),
        (
            "cut in the tensor infos",
            truncated_in_tensor_infos(),
            |r| matches!(r, Err(GgufError::Truncated { .. })),
        ),
    ];
    for (what, bytes, expected) in &files {
        let whole = check(bytes);
        assert!(expected(&whole), "{what}: {whole:?}");
        let want = format!("{whole:?}");
        for capacity in [1, 2, 7, 8, 9, 13, 64, 301, 4096, 1 << 20] {
            let reader = std::io::BufReader::with_capacity(capacity, &bytes[..]);
            let got = format!(
                "{:?}",
                inspect(reader, bytes.len() as u64, &Limits::default())
            );
            assert_eq!(got, want, "{what}, read through a {capacity}-byte buffer");
        }
    }
    // The errors name where the bad token starts.
    for (bytes, token) in [(&bad_late_token, "tok1500"), (&long_late_token, "tok1899")] {
        let e = check(bytes).unwrap_err();
        let at = string_at(&big_vocabulary, token) as u64;
        match e {
            GgufError::InvalidUtf8 { offset, .. } | GgufError::StringTooLong { offset, .. } => {
                assert_eq!(offset, at, "{e}")
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn every_prefix_of_a_valid_file_is_refused_without_panicking() {
    let bytes = tiny_llama_bytes();
    check(&bytes).unwrap();
    for len in 0..bytes.len() {
        match check(&bytes[..len]) {
            Err(GgufError::Truncated { offset, .. }) => assert!(offset <= len as u64),
            Err(GgufError::TensorOutOfBounds { file_len, .. }) => {
                assert_eq!(file_len, len as u64)
            }
            other => panic!("prefix of {len} bytes: {other:?}"),
        }
    }
}

#[test]
fn a_reader_that_ends_before_the_stated_length_is_a_truncated_file() {
    let bytes = tiny_llama_bytes();
    let header_end = tensor_offset_at(&bytes, "blk.0.attn_q.weight") + 8;
    for len in 0..header_end {
        let e = inspect(&bytes[..len], bytes.len() as u64, &Limits::default()).unwrap_err();
        assert!(matches!(e, GgufError::Truncated { .. }), "{len}: {e:?}");
    }
}

#[test]
fn counts_within_the_limits_that_the_file_cannot_hold_are_truncation() {
    // The minimal file without its padding: it ends right after its one metadata pair.
    let mut header_only = minimal().to_bytes();
    header_only.truncate(value_type_at(&header_only, "general.architecture") + 4 + 8 + 5);
    let mut more_pairs = header_only.clone();
    put_u64(&mut more_pairs, 16, 60_000);
    let e = assert_refused!(more_pairs, GgufError::Truncated { .. });
    assert!(e.to_string().contains("key of metadata pair 1"), "{e}");
    let mut more_tensors = header_only;
    put_u64(&mut more_tensors, 8, 60_000);
    let e = assert_refused!(more_tensors, GgufError::Truncated { .. });
    assert!(e.to_string().contains("name of tensor 0"), "{e}");
    let many_tokens = patched(|b| {
        let at = value_type_at(b, "tokenizer.ggml.tokens") + 8;
        put_u64(b, at, 1_000_000);
    });
    assert_refused!(many_tokens, GgufError::Truncated { .. });
    let many_scores = patched(|b| {
        let at = value_type_at(b, "tokenizer.ggml.scores") + 8;
        put_u64(b, at, 1_000_000);
    });
    assert_refused!(many_scores, GgufError::Truncated { .. });
    assert_refused!(truncated_in_tensor_infos(), GgufError::Truncated { .. });
}

// ---------------------------------------------------------------------------------------------
// The malformed corpus.

#[test]
fn a_wrong_magic_is_refused() {
    assert_refused!(wrong_magic(), GgufError::BadMagic { found } if found == b"GGML");
}

#[test]
fn unsupported_versions_and_big_endian_files_are_refused() {
    assert_refused!(version_1(), GgufError::UnsupportedVersion(1));
    assert_refused!(
        patched(|b| put_u32(b, 4, 4)),
        GgufError::UnsupportedVersion(4)
    );
    assert_refused!(big_endian(), GgufError::BigEndian { .. });
}

#[test]
fn huge_tensor_and_metadata_counts_are_refused_before_reading_on() {
    assert_refused!(
        huge_tensor_count(),
        GgufError::TooMany {
            count: u64::MAX,
            limit: 65_536,
            ..
        }
    );
    assert_refused!(
        huge_kv_count(),
        GgufError::TooMany {
            count: u64::MAX,
            limit: 65_536,
            ..
        }
    );
}

#[test]
fn huge_string_lengths_are_refused() {
    let e = assert_refused!(
        huge_key_length(),
        GgufError::StringTooLong { offset: 24, .. }
    );
    assert!(e.to_string().contains("key of metadata pair 0"), "{e}");
    let e = assert_refused!(huge_string_value(), GgufError::StringTooLong { len, .. } if *len == 2 << 30);
    assert!(e.to_string().contains("general.name"), "{e}");
}

#[test]
fn huge_array_lengths_are_refused() {
    let e = assert_refused!(
        huge_array_length(),
        GgufError::TooMany {
            count: u64::MAX,
            ..
        }
    );
    assert!(e.to_string().contains("tokenizer.ggml.tokens"), "{e}");
}

#[test]
fn tensor_data_outside_the_file_is_refused() {
    let e = assert_refused!(
        tensor_offset_out_of_range(),
        GgufError::TensorOutOfBounds { offset, .. } if *offset == 1 << 40
    );
    assert!(e.to_string().contains("blk.0.attn_q.weight"), "{e}");
    assert_refused!(
        tensor_offset_overflowing(),
        GgufError::TensorOutOfBounds { .. }
    );
}

#[test]
fn overlapping_tensors_are_refused() {
    assert_refused!(
        overlapping_tensors(),
        GgufError::OverlappingTensors { a, b } if a == "token_embd.weight" && b == "output_norm.weight"
    );
}

#[test]
fn a_misaligned_tensor_offset_is_refused() {
    assert_refused!(
        misaligned_tensor(),
        GgufError::MisalignedTensor {
            offset: 1025,
            alignment: 32,
            ..
        }
    );
}

#[test]
fn unknown_tensor_types_are_refused() {
    assert_refused!(
        unknown_tensor_type(),
        GgufError::UnknownTensorType { type_id: 4, .. }
    );
    for id in [31, 36, 42, u32::MAX] {
        let bytes = minimal()
            .tensor_raw("t", &[32], id, vec![0u8; 32])
            .to_bytes();
        assert_refused!(bytes, GgufError::UnknownTensorType { type_id, .. } if *type_id == id);
    }
}

#[test]
fn unknown_value_types_and_nested_arrays_are_refused() {
    assert_refused!(
        bad_value_type(),
        GgufError::BadValueType { key, type_id: 13 } if key == "llama.context_length"
    );
    assert_refused!(
        bad_array_element_type(),
        GgufError::BadValueType { key, type_id: 13 } if key == "tokenizer.ggml.token_type"
    );
    assert_refused!(nested_array(), GgufError::NestedArray { key } if key == "nested");
}

#[test]
fn duplicate_keys_and_tensor_names_are_refused() {
    assert_refused!(duplicate_key(), GgufError::DuplicateKey(k) if k == "general.name");
    assert_refused!(duplicate_tensor(), GgufError::DuplicateTensor(t) if t == "t");
}

#[test]
fn a_missing_or_disallowed_architecture_is_refused() {
    assert_refused!(
        disallowed_architecture(),
        GgufError::ArchitectureNotAllowed(a) if a == "gpt2"
    );
    assert_refused!(missing_architecture(), GgufError::MissingArchitecture);
    assert_refused!(
        architecture_not_a_string(),
        GgufError::WrongValueType { key, .. } if key == "general.architecture"
    );
}

#[test]
fn oversized_chat_templates_are_refused() {
    assert_refused!(
        oversized_chat_template(),
        GgufError::ChatTemplateTooLarge { key, len: 65_537, limit: 65_536 }
            if key == "tokenizer.chat_template"
    );
    assert_refused!(
        oversized_named_chat_template(),
        GgufError::ChatTemplateTooLarge { key, .. } if key == "tokenizer.chat_template.tool_use"
    );
    let exactly_at_limit = minimal()
        .kv_string("tokenizer.chat_template", &"x".repeat(64 * 1024))
        .to_bytes();
    assert!(check(&exactly_at_limit).unwrap().has_chat_template);
    let not_a_string = minimal().kv_u32("tokenizer.chat_template", 1).to_bytes();
    assert_refused!(not_a_string, GgufError::WrongValueType { .. });
}

#[test]
fn bad_alignment_values_are_refused() {
    assert_refused!(alignment_not_power_of_two(), GgufError::BadAlignment(48));
    assert_refused!(alignment_zero(), GgufError::BadAlignment(0));
    assert_refused!(alignment_too_large(), GgufError::BadAlignment(a) if *a == 2 << 20);
    assert_refused!(
        alignment_wrong_type(),
        GgufError::WrongValueType { key, .. } if key == "general.alignment"
    );
}

#[test]
fn zero_missing_and_surplus_dimensions_are_refused() {
    let e = assert_refused!(zero_dim(), GgufError::BadDimensions { .. });
    assert!(e.to_string().contains("zero"), "{e}");
    assert_refused!(too_many_dims(), GgufError::BadDimensions { .. });
    assert_refused!(no_dims(), GgufError::BadDimensions { .. });
    assert_refused!(partial_block(), GgufError::BadDimensions { .. });
}

#[test]
fn dimensions_whose_size_overflows_are_refused() {
    assert_refused!(element_count_overflow(), GgufError::SizeOverflow { .. });
    assert_refused!(element_count_past_i64(), GgufError::SizeOverflow { .. });
    assert_refused!(byte_size_overflow(), GgufError::SizeOverflow { .. });
}

#[test]
fn invalid_utf8_in_keys_values_and_array_elements_is_refused() {
    assert_refused!(invalid_utf8_key(), GgufError::InvalidUtf8 { .. });
    assert_refused!(invalid_utf8_value(), GgufError::InvalidUtf8 { .. });
    let e = assert_refused!(invalid_utf8_array_element(), GgufError::InvalidUtf8 { .. });
    assert!(
        e.to_string()
            .contains("element 2 of `tokenizer.ggml.tokens`"),
        "{e}"
    );
}

#[test]
fn tensor_names_longer_than_ggml_allows_are_refused() {
    assert_refused!(
        tensor_name_too_long(),
        GgufError::StringTooLong { limit: 63, .. }
    );
    let just_fits = minimal()
        .tensor_f32(&"n".repeat(63), &[8], &[0.0; 8])
        .to_bytes();
    check(&just_fits).unwrap();
}

#[test]
fn keys_the_facts_come_from_must_have_the_expected_type() {
    let bytes = minimal()
        .kv_string("llama.context_length", "long")
        .to_bytes();
    assert_refused!(
        bytes,
        GgufError::WrongValueType { key, .. } if key == "llama.context_length"
    );
    let bytes = minimal().kv_i32("llama.block_count", -1).to_bytes();
    assert_refused!(bytes, GgufError::WrongValueType { .. });
    let bytes = minimal().kv_u32("general.name", 1).to_bytes();
    assert_refused!(bytes, GgufError::WrongValueType { .. });
    // Any non-negative integer type is fine.
    let bytes = minimal().kv_i64("llama.context_length", 8192).to_bytes();
    assert_eq!(check(&bytes).unwrap().context_length, Some(8192));
}

/// Thousands of deterministic mutations of the valid file (byte and word overwrites with
/// edge values): each is accepted or refused, never a panic, and what is accepted still
/// describes tensor data inside the file.
#[test]
fn random_mutations_of_a_valid_file_never_panic() {
    let base = tiny_llama_bytes();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    const EDGES: [u64; 8] = [0, 1, 31, 32, 0xff, 1 << 32, i64::MAX as u64, u64::MAX];
    for _ in 0..20_000 {
        let mut bytes = base.clone();
        for _ in 0..1 + next() % 3 {
            if bytes.is_empty() {
                break;
            }
            let at = (next() % bytes.len() as u64) as usize;
            match next() % 3 {
                0 => bytes[at] = next() as u8,
                1 => {
                    let v = EDGES[(next() % 8) as usize].to_le_bytes();
                    let n = (bytes.len() - at).min(if next() % 2 == 0 { 4 } else { 8 });
                    bytes[at..at + n].copy_from_slice(&v[..n]);
                }
                _ => bytes.truncate(at),
            }
        }
        if let Ok(facts) = check(&bytes) {
            assert!(facts.tensor_data_bytes <= bytes.len() as u64);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fuzz seeds.

fn seed_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/gguf_inspect")
}

/// The committed fuzz seeds: a few valid files and a spread of malformed ones. Names starting
/// `seed-ok-` must be accepted, `seed-bad-` refused.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("seed-ok-tiny-llama.gguf", tiny_llama_bytes()),
        (
            "seed-ok-q4-k-m-v2.gguf",
            GgufWriter::new(2)
                .kv_string("general.architecture", "gemma3")
                .kv_u32("general.file_type", 15)
                .alignment(64)
                .tensor_raw(
                    "blk.0.ffn_up.weight",
                    &[256, 1],
                    GgmlType::Q4_K,
                    vec![1u8; 144],
                )
                .tensor_raw(
                    "blk.0.ffn_down.weight",
                    &[256, 1],
                    GgmlType::Q6_K,
                    vec![2u8; 210],
                )
                .to_bytes(),
        ),
        ("seed-bad-magic.gguf", wrong_magic()),
        ("seed-bad-big-endian.gguf", big_endian()),
        ("seed-bad-huge-kv-count.gguf", huge_kv_count()),
        ("seed-bad-huge-array.gguf", huge_array_length()),
        ("seed-bad-overlapping-tensors.gguf", overlapping_tensors()),
        ("seed-bad-misaligned-tensor.gguf", misaligned_tensor()),
        ("seed-bad-unknown-tensor-type.gguf", unknown_tensor_type()),
        ("seed-bad-nested-array.gguf", nested_array()),
        ("seed-bad-size-overflow.gguf", byte_size_overflow()),
        ("seed-bad-truncated.gguf", truncated_in_tensor_infos()),
    ]
}

#[test]
fn fuzz_seed_files_are_what_the_generator_writes_and_are_judged_by_their_names() {
    let dir = seed_dir();
    let seeds = seeds();
    if std::env::var_os("STEWARD_WRITE_FUZZ_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    for (name, bytes) in &seeds {
        assert!(bytes.len() < 10 * 1024, "{name} is {} bytes", bytes.len());
        let path = dir.join(name);
        let on_disk = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            on_disk == *bytes,
            "{name} differs from the generator; rerun with STEWARD_WRITE_FUZZ_SEEDS=1"
        );
        let verdict = inspect_file(&path, &Limits::default());
        if name.starts_with("seed-ok-") {
            verdict.unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            assert!(verdict.is_err(), "{name} was accepted");
        }
    }
    // No stale seed files the generator no longer writes.
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.starts_with("seed-") {
            assert!(seeds.iter().any(|(n, _)| *n == name), "stale seed {name}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A real model, when one is at hand.

/// Set `STEWARD_GEMMA_GGUF` to a gemma GGUF file to check the reader against a real model;
/// without it this test has nothing to check.
#[test]
fn a_real_gemma_file_inspects_when_one_is_given() {
    let Some(path) = std::env::var_os("STEWARD_GEMMA_GGUF") else {
        return;
    };
    let facts = inspect_file(Path::new(&path), &Limits::default()).unwrap();
    assert!(facts.architecture.starts_with("gemma"), "{facts:?}");
    assert!(
        facts.parameter_count > 0 && facts.tensor_count > 0,
        "{facts:?}"
    );
    assert!(
        facts.block_count.is_some() && facts.context_length.is_some(),
        "{facts:?}"
    );
    assert!(facts.kv_cache_bytes(4096).is_some(), "{facts:?}");
    assert!(
        facts.estimated_load_bytes > facts.tensor_data_bytes,
        "{facts:?}"
    );
}
