//! The GGUF pre-parse run on an artifact's bytes as they arrive (a push to the control plane,
//! a pull by an agent) instead of on the written file afterwards. The parser only needs the
//! header (metadata and tensor infos, checked against the announced size), so it finishes
//! early in the stream and its cost, megabytes of vocabulary strings for a large tokenizer,
//! overlaps the transfer. The checks are the same [`super::inspect`] makes on a file.

use bytes::{Buf, Bytes};

use super::{GgufError, GgufFacts, Limits};

/// Chunks queued for the parser. Each is a reference to bytes the transfer holds anyway, so
/// this bounds the extra memory to a few chunks while the header is parsed.
const QUEUE: usize = 16;

pub struct GgufProbe {
    feed: Option<tokio::sync::mpsc::Sender<Bytes>>,
    parse: tokio::task::JoinHandle<Result<GgufFacts, GgufError>>,
}

impl GgufProbe {
    /// Starts parsing a transfer of `total_len` bytes (the announced size; a transfer of any
    /// other size is refused before its facts are used).
    pub fn start(total_len: u64, limits: Limits) -> Self {
        let (feed, chunks) = tokio::sync::mpsc::channel(QUEUE);
        let parse = tokio::task::spawn_blocking(move || {
            let reader = ChunkReader {
                chunks,
                current: Bytes::new(),
            };
            super::inspect(reader, total_len, &limits)
        });
        Self {
            feed: Some(feed),
            parse,
        }
    }

    /// Hands the parser the transfer's next bytes, until it has read all it needs.
    pub async fn feed(&mut self, chunk: Bytes) {
        if let Some(feed) = &self.feed
            && feed.send(chunk).await.is_err()
        {
            // The parser is done (or failed); it needs no more bytes.
            self.feed = None;
        }
    }

    /// The parser's verdict once the whole transfer has been fed. `None` when the parser
    /// itself broke (a panic, logged here); the caller then inspects the written file instead.
    pub async fn finish(mut self) -> Option<Result<GgufFacts, GgufError>> {
        self.feed = None;
        self.parse
            .await
            .inspect_err(|e| tracing::error!(error = %e, "the streaming GGUF pre-parse stopped"))
            .ok()
    }
}

/// Reads the fed chunks in order; the end of the feed is the end of the file.
struct ChunkReader {
    chunks: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let current = std::io::BufRead::fill_buf(self)?;
        let n = buf.len().min(current.len());
        buf[..n].copy_from_slice(&current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// The chunk being parsed is the buffer: the parser reads from it in place.
impl std::io::BufRead for ChunkReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => break,
            }
        }
        Ok(&self.current)
    }

    fn consume(&mut self, n: usize) {
        self.current.advance(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::writer::GgufWriter;

    fn model() -> Vec<u8> {
        let vocab: Vec<String> = (0..5000).map(|i| format!("token-{i}")).collect();
        GgufWriter::new(3)
            .kv_string("general.architecture", "llama")
            .kv_u32("llama.block_count", 2)
            .kv_u32("llama.context_length", 256)
            .kv_string_array("tokenizer.ggml.tokens", &vocab)
            .tensor_f32("w", &[64, 64], &vec![0.5; 64 * 64])
            .to_bytes()
    }

    async fn probe(bytes: &[u8], announced: u64, chunk: usize) -> Result<GgufFacts, GgufError> {
        let mut probe = GgufProbe::start(announced, Limits::default());
        for piece in bytes.chunks(chunk) {
            probe.feed(Bytes::copy_from_slice(piece)).await;
        }
        probe.finish().await.expect("the parser ran")
    }

    #[tokio::test]
    async fn streamed_pre_parse_finds_the_same_facts_as_the_file_check() {
        let bytes = model();
        let expected =
            crate::gguf::inspect(&bytes[..], bytes.len() as u64, &Limits::default()).unwrap();
        for chunk in [1, 7, 4096, 1 << 20] {
            let facts = probe(&bytes, bytes.len() as u64, chunk).await.unwrap();
            assert_eq!(
                serde_json::to_value(&facts).unwrap(),
                serde_json::to_value(&expected).unwrap(),
                "chunks of {chunk} bytes"
            );
        }
    }

    #[tokio::test]
    async fn streamed_pre_parse_refuses_what_the_file_check_refuses() {
        let bytes = model();
        // Cut off inside the vocabulary: the stream ends before the header does.
        let cut = &bytes[..bytes.len() / 3];
        let err = probe(cut, cut.len() as u64, 4096).await.unwrap_err();
        assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
        // Tensor data announced past the end of the transfer.
        let err = probe(&bytes, bytes.len() as u64 - 1, 4096)
            .await
            .unwrap_err();
        let file_err = crate::gguf::inspect(
            &bytes[..bytes.len() - 1],
            bytes.len() as u64 - 1,
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), file_err.to_string());
        let mut wrong_magic = bytes.clone();
        wrong_magic[..4].copy_from_slice(b"GGML");
        let err = probe(&wrong_magic, bytes.len() as u64, 4096)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");
    }
}
