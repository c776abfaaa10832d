//! The in-toto Statement v1 with the `model_signing` v1.0 predicate: building it for signing
//! and reading it back after the signature has been checked.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ModelFile, SigningError};
use crate::digest::Sha256Hex;

/// in-toto Statement v1.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// The model signing v1.0 predicate.
pub const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";

#[derive(Serialize, Deserialize)]
struct Statement<P> {
    #[serde(rename = "_type")]
    statement_type: String,
    subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    predicate_type: String,
    predicate: P,
}

#[derive(Serialize, Deserialize)]
struct Subject {
    #[serde(default)]
    name: String,
    #[serde(default)]
    digest: BTreeMap<String, String>,
}

/// Fields other than these are allowed and ignored, as the v1.0 predicate asks of verifiers.
#[derive(Serialize, Deserialize)]
struct Predicate {
    serialization: Serialization,
    resources: Vec<Resource>,
}

#[derive(Serialize, Deserialize)]
struct Serialization {
    method: String,
    hash_type: String,
    allow_symlinks: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ignore_paths: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Resource {
    name: String,
    algorithm: String,
    digest: String,
}

/// A statement that passed the format checks (the signature is checked elsewhere).
#[derive(Clone, Debug)]
pub(crate) struct ParsedStatement {
    pub model_name: String,
    pub subject_digest: Sha256Hex,
    /// In the statement's order; names are unique.
    pub files: Vec<(String, Sha256Hex)>,
    pub ignore_paths: Vec<String>,
}

/// The order `model_signing` lists resources in: Python's `PurePosixPath` ordering, which
/// compares the paths component by component (so `a/b` < `a-b` < `a.b`, although `-` and `.`
/// sort before `/` as bytes). Components compare by code point, which is UTF-8 byte order.
pub fn model_path_order(a: &str, b: &str) -> Ordering {
    a.split('/').cmp(b.split('/'))
}

/// The statement subject's digest: sha256 over the concatenated raw (32-byte) digests of the
/// resources, in the order they are listed.
pub fn subject_digest<'a>(digests: impl IntoIterator<Item = &'a Sha256Hex>) -> Sha256Hex {
    let mut hasher = Sha256::new();
    for digest in digests {
        hasher.update(raw_digest(digest));
    }
    Sha256Hex::from_bytes(hasher.finalize().into())
}

fn raw_digest(digest: &Sha256Hex) -> [u8; 32] {
    let mut raw = [0u8; 32];
    // A `Sha256Hex` always holds 64 hex characters.
    hex::decode_to_slice(digest.as_str(), &mut raw).expect("Sha256Hex holds 64 hex characters");
    raw
}

/// Builds the statement JSON (pretty-printed with two-space indents, like `model_signing`).
/// Files are sorted into [`model_path_order`]; names must be unique and well formed.
pub(crate) fn build(
    model_name: &str,
    files: &[ModelFile<'_>],
    ignore_paths: &[&str],
) -> Result<Vec<u8>, SigningError> {
    let mut sorted: Vec<ModelFile<'_>> = files.to_vec();
    sorted.sort_by(|a, b| model_path_order(a.name, b.name));
    for pair in sorted.windows(2) {
        if pair[0].name == pair[1].name {
            return Err(SigningError::InvalidInput(format!(
                "file {:?} is listed twice",
                pair[0].name
            )));
        }
    }
    for file in &sorted {
        check_resource_name(file.name).map_err(SigningError::InvalidInput)?;
        if file.name == "." && sorted.len() > 1 {
            return Err(SigningError::InvalidInput(
                "\".\" names a single-file model and cannot be listed with other files".into(),
            ));
        }
    }
    let statement = Statement {
        statement_type: STATEMENT_TYPE.into(),
        subject: vec![Subject {
            name: model_name.into(),
            digest: BTreeMap::from([(
                "sha256".to_string(),
                subject_digest(sorted.iter().map(|f| f.sha256)).to_string(),
            )]),
        }],
        predicate_type: PREDICATE_TYPE.into(),
        predicate: Predicate {
            serialization: Serialization {
                method: "files".into(),
                hash_type: "sha256".into(),
                allow_symlinks: false,
                ignore_paths: ignore_paths.iter().map(|p| p.to_string()).collect(),
            },
            resources: sorted
                .iter()
                .map(|f| Resource {
                    name: f.name.into(),
                    algorithm: "sha256".into(),
                    digest: f.sha256.to_string(),
                })
                .collect(),
        },
    };
    serde_json::to_vec_pretty(&statement)
        .map_err(|e| SigningError::InvalidInput(format!("cannot encode the statement: {e}")))
}

/// Parses and checks a statement: statement and predicate types, one subject, file
/// serialization with sha256, unique well-formed names, and the subject digest.
pub(crate) fn parse(payload: &[u8]) -> Result<ParsedStatement, SigningError> {
    let malformed = |what: String| SigningError::MalformedBundle(format!("statement: {what}"));
    let statement: Statement<serde_json::Value> =
        serde_json::from_slice(payload).map_err(|e| malformed(e.to_string()))?;
    if statement.statement_type != STATEMENT_TYPE {
        return Err(SigningError::WrongStatementType(statement.statement_type));
    }
    if statement.predicate_type != PREDICATE_TYPE {
        return Err(SigningError::WrongPredicate(statement.predicate_type));
    }
    let [subject] = &statement.subject[..] else {
        return Err(malformed(format!(
            "expected exactly one subject, found {}",
            statement.subject.len()
        )));
    };
    let recorded = subject
        .digest
        .get("sha256")
        .ok_or_else(|| malformed("the subject has no sha256 digest".into()))?;
    let predicate: Predicate =
        serde_json::from_value(statement.predicate).map_err(|e| malformed(e.to_string()))?;

    let serialization = &predicate.serialization;
    if serialization.method != "files" {
        return Err(SigningError::UnsupportedSerialization(format!(
            "method {:?} (only \"files\" is supported)",
            serialization.method
        )));
    }
    if serialization.hash_type != "sha256" {
        return Err(SigningError::UnsupportedSerialization(format!(
            "hash type {:?} (only \"sha256\" is supported)",
            serialization.hash_type
        )));
    }

    let mut files = Vec::with_capacity(predicate.resources.len());
    let mut seen = HashSet::new();
    for resource in predicate.resources {
        if resource.algorithm != "sha256" {
            return Err(SigningError::UnsupportedSerialization(format!(
                "resource {:?} uses algorithm {:?} (only \"sha256\" is supported)",
                resource.name, resource.algorithm
            )));
        }
        check_resource_name(&resource.name).map_err(malformed)?;
        let digest = parse_hex_digest(&resource.digest).ok_or_else(|| {
            malformed(format!(
                "resource {:?} has an invalid sha256 digest",
                resource.name
            ))
        })?;
        if !seen.insert(resource.name.clone()) {
            return Err(malformed(format!(
                "resource {:?} is listed twice",
                resource.name
            )));
        }
        files.push((resource.name, digest));
    }
    if files.len() > 1 && seen.contains(".") {
        return Err(malformed(
            "\".\" names a single-file model and cannot be listed with other files".into(),
        ));
    }

    let computed = subject_digest(files.iter().map(|(_, d)| d));
    if parse_hex_digest(recorded).as_ref() != Some(&computed) {
        return Err(SigningError::SubjectDigestMismatch {
            recorded: recorded.clone(),
            computed,
        });
    }
    Ok(ParsedStatement {
        model_name: subject.name.clone(),
        subject_digest: computed,
        files,
        ignore_paths: predicate.serialization.ignore_paths,
    })
}

/// 64 hex digits, nothing else (`model_signing` reads digests with `bytes.fromhex`).
fn parse_hex_digest(text: &str) -> Option<Sha256Hex> {
    (text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| Sha256Hex::parse(text))
        .flatten()
}

/// A resource name is `"."` (a single-file model) or a relative POSIX path with no empty,
/// `.` or `..` components.
fn check_resource_name(name: &str) -> Result<(), String> {
    if name == "." {
        return Ok(());
    }
    let bad = name.is_empty()
        || name.contains('\0')
        || name
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        Err(format!("{name:?} is not a relative path inside the model"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Sha256Hex {
        Sha256Hex::parse(s).unwrap()
    }

    #[test]
    fn subject_digest_matches_model_signing() {
        // Produced by `model_signing sign key` 1.1.1 for a directory with `a.b`, `a.txt` and
        // `sub/b.bin`, and for a single file.
        let digests = [
            hex("2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"),
            hex("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"),
            hex("e258d248fda94c63753607f7c4494ee0fcbe92f1a76bfdac795c9d84101eb317"),
        ];
        assert_eq!(
            subject_digest(&digests).as_str(),
            "33366f282d6347194044d882d56b717e735887ffd9b8484e820d62062eeaab59"
        );
        let single = [hex(
            "f9ea4b8413f7b84383d16b6fdf36872439f9d7223623480c0eebfba0e5291ded",
        )];
        assert_eq!(
            subject_digest(&single).as_str(),
            "eaf11f7282215d586d58b1bf1a2bec2bd31e93f3874d37f716288c1407e9167d"
        );
        // No files: the digest of nothing.
        assert_eq!(
            subject_digest(&[]).as_str(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn paths_sort_component_by_component_like_python() {
        // The order `model_signing` 1.1.1 wrote for these names.
        let expected = [".hidden", "B", "a/b", "a-b", "a.b"];
        let mut names = ["a.b", "a-b", "B", "a/b", ".hidden"];
        names.sort_by(|a, b| model_path_order(a, b));
        assert_eq!(names, expected);
        assert_eq!(model_path_order("a/b/c", "a/b"), Ordering::Greater);
        assert_eq!(model_path_order("a/b", "a/b"), Ordering::Equal);
    }

    #[test]
    fn a_built_statement_parses_back_sorted() {
        let (d1, d2) = (hex(&"1".repeat(64)), hex(&"2".repeat(64)));
        let files = [
            ModelFile {
                name: "a.b",
                sha256: &d1,
            },
            ModelFile {
                name: "a/b",
                sha256: &d2,
            },
        ];
        let json = build("m", &files, &[".git"]).unwrap();
        let parsed = parse(&json).unwrap();
        assert_eq!(parsed.model_name, "m");
        assert_eq!(
            parsed.files,
            vec![
                ("a/b".to_string(), d2.clone()),
                ("a.b".to_string(), d1.clone())
            ]
        );
        assert_eq!(parsed.subject_digest, subject_digest([&d2, &d1]));
        assert_eq!(parsed.ignore_paths, vec![".git".to_string()]);
    }

    #[test]
    fn building_refuses_duplicate_or_escaping_names() {
        let d = hex(&"1".repeat(64));
        let file = |name| ModelFile { name, sha256: &d };
        for files in [
            vec![file("x"), file("x")],
            vec![file("../x")],
            vec![file("/x")],
            vec![file("a//b")],
            vec![file("."), file("x")],
        ] {
            assert!(matches!(
                build("m", &files, &[]),
                Err(SigningError::InvalidInput(_))
            ));
        }
    }

    fn statement_json(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let d = hex(&"1".repeat(64));
        let json = build(
            "m",
            &[ModelFile {
                name: "x",
                sha256: &d,
            }],
            &[],
        )
        .unwrap();
        let mut value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        edit(&mut value);
        serde_json::to_vec(&value).unwrap()
    }

    #[test]
    fn parsing_refuses_what_is_not_a_v1_model_signature() {
        let err = parse(&statement_json(|v| v["_type"] = "x".into())).unwrap_err();
        assert!(matches!(err, SigningError::WrongStatementType(t) if t == "x"));
        let err = parse(&statement_json(|v| {
            v["predicateType"] = "https://model_signing/Digests/v0.1".into()
        }))
        .unwrap_err();
        assert!(matches!(err, SigningError::WrongPredicate(_)));
        let err = parse(&statement_json(|v| {
            v["predicate"]["serialization"]["method"] = "shards".into()
        }))
        .unwrap_err();
        assert!(matches!(err, SigningError::UnsupportedSerialization(_)));
        let err = parse(&statement_json(|v| {
            v["predicate"]["serialization"]["hash_type"] = "blake3".into()
        }))
        .unwrap_err();
        assert!(matches!(err, SigningError::UnsupportedSerialization(_)));
        let err = parse(&statement_json(|v| {
            v["subject"][0]["digest"]["sha256"] = "0".repeat(64).into()
        }))
        .unwrap_err();
        assert!(matches!(err, SigningError::SubjectDigestMismatch { .. }));
        let err = parse(&statement_json(|v| {
            v["predicate"]["resources"][0]["name"] = "../etc/passwd".into()
        }))
        .unwrap_err();
        assert!(matches!(err, SigningError::MalformedBundle(_)));
        let err = parse(&statement_json(|v| {
            v["subject"] = serde_json::json!([]);
        }))
        .unwrap_err();
        assert!(matches!(err, SigningError::MalformedBundle(_)));
        let err = parse(b"not json").unwrap_err();
        assert!(matches!(err, SigningError::MalformedBundle(_)));
    }

    #[test]
    fn parsing_ignores_unknown_predicate_fields() {
        let json = statement_json(|v| v["predicate"]["model_card"] = "later".into());
        assert_eq!(parse(&json).unwrap().files.len(), 1);
    }
}
