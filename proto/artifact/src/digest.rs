//! sha256 of artifact bytes, computed while they stream.

use sha2::{Digest, Sha256};
use std::io::Read;

/// A sha256 digest as lowercase hex.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Sha256Hex(String);

impl Sha256Hex {
    /// Parses 64 hex characters (an optional `sha256:` prefix is accepted).
    pub fn parse(text: &str) -> Option<Self> {
        let hex = text.strip_prefix("sha256:").unwrap_or(text);
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Self(hex.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(hex::encode(bytes))
    }
}

impl std::fmt::Display for Sha256Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Incremental hasher that also counts bytes.
#[derive(Clone, Debug, Default)]
pub struct StreamingDigest {
    hasher: Sha256,
    len: u64,
}

impl StreamingDigest {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.len += chunk.len() as u64;
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> Sha256Hex {
        Sha256Hex::from_bytes(self.hasher.finalize().into())
    }
}

/// Hashes everything `reader` yields, in 1 MiB chunks.
pub fn sha256_reader(mut reader: impl Read) -> std::io::Result<(Sha256Hex, u64)> {
    let mut digest = StreamingDigest::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
    }
    let len = digest.len();
    Ok((digest.finish(), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_digest_matches_a_known_vector() {
        let (digest, len) = sha256_reader(&b"abc"[..]).unwrap();
        assert_eq!(len, 3);
        assert_eq!(
            digest.as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn digests_parse_with_or_without_prefix_and_reject_junk() {
        let hex = "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD";
        assert_eq!(
            Sha256Hex::parse(&format!("sha256:{hex}")).unwrap().as_str(),
            hex.to_ascii_lowercase()
        );
        assert!(Sha256Hex::parse("abc").is_none());
        assert!(Sha256Hex::parse(&"g".repeat(64)).is_none());
    }
}
