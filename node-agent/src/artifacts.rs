//! The agent's artifact cache: pulls assigned artifacts from the control plane in chunks,
//! resuming where a dropped connection or a restart left off, hashes while it receives,
//! re-verifies the signature and the GGUF header under the trust policy the control plane
//! sent, and only then renames the file into the cache (ARCHITECTURE.md invariant 4).
//!
//! Layout under `<data dir>/artifacts/`: `<digest>.gguf` (verified), `partial/<digest>`
//! (being received). A cached file's modification time is its last use, for LRU eviction.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use steward_artifact::digest::{Sha256Hex, StreamingDigest};
use steward_artifact::direct_write::{AlignedBlock, DirectWriter, aligned_block};
use steward_artifact::gguf::stream::GgufProbe;
use steward_artifact::gguf::{GgufError, GgufFacts, Limits, inspect_file};
use steward_artifact::policy::{Policy, ScopedAnchor};
use steward_artifact::signing::TrustAnchor;
use steward_proto::agent::v1::agent_service_client::AgentServiceClient;
use steward_proto::agent::v1::{
    AgentTrustPolicy, CachedArtifact, FetchArtifactRequest, ModelAssignment,
};
use steward_proto::transport::Windows;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The transfer broke off; what arrived is kept and the next attempt resumes.
    #[error("the transfer was interrupted at byte {at}: {reason}")]
    Interrupted { at: u64, reason: String },
    /// The bytes do not hash to the digest; they were discarded and are fetched again.
    #[error("received bytes hash to {got}, not {want}; discarded")]
    DigestMismatch { want: String, got: String },
    /// The artifact failed verification here; it is never loaded.
    #[error("refused: {0}")]
    Refused(String),
    #[error("the artifact cache at {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ArtifactError {
    /// Whether trying again can help.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Interrupted { .. } | Self::DigestMismatch { .. } | Self::Io { .. }
        )
    }
}

#[derive(Clone, Debug)]
pub struct ArtifactCache {
    dir: PathBuf,
    partial: PathBuf,
    /// Evict least-recently-used artifacts that no assignment needs above this many bytes.
    budget_bytes: u64,
    /// Cap on pull speed, bytes per second (so a pull does not fill a shared link).
    rate_limit: Option<u64>,
    /// HTTP/2 receive windows of the channel a pull runs on.
    pull_windows: Windows,
    /// Notified whenever the disk the cache takes changed: a pull's bytes all arrived, or a
    /// file was deleted.
    changed: std::sync::Arc<tokio::sync::Notify>,
}

/// Where the artifact cache of the agent with `data_dir` keeps verified artifacts
/// (`<digest>.gguf`), and, in [`PARTIAL`] below it, the partial files of pulls (`<digest>`).
fn cache_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("artifacts")
}

const PARTIAL: &str = "partial";

/// What the artifact cache under `data_dir` holds now, for the inventory: each verified
/// artifact and each pull's partial file, with its bytes on disk; files not named for a
/// digest are left out. `Ok(None)` where there is no cache (an agent that does not serve
/// models); an error where it cannot be read.
pub fn listing(data_dir: &Path) -> std::io::Result<Option<Vec<CachedArtifact>>> {
    let dir = cache_dir(data_dir);
    if !dir.join(PARTIAL).is_dir() {
        return Ok(None);
    }
    let mut listed = Vec::new();
    for (dir, complete) in [(dir.join(PARTIAL), false), (dir, true)] {
        let unreadable = |e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("cannot list {}: {e}", dir.display()))
        };
        for entry in std::fs::read_dir(&dir).map_err(unreadable)? {
            let entry = entry.map_err(unreadable)?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let digest = if complete {
                name.strip_suffix(".gguf")
            } else {
                Some(name.as_str())
            };
            let Some(digest) = digest.and_then(Sha256Hex::parse) else {
                continue;
            };
            // Gone since the directory was read: renamed into the cache (listed there
            // next) or deleted.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_file() {
                listed.push(CachedArtifact {
                    digest: digest.to_string(),
                    bytes: meta.len(),
                    complete,
                });
            }
        }
    }
    listed.sort_by(|a, b| (&a.digest, a.complete).cmp(&(&b.digest, b.complete)));
    Ok(Some(listed))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.to_owned(),
        source,
    }
}

impl ArtifactCache {
    pub fn open(data_dir: &Path, budget_bytes: u64) -> Result<Self, ArtifactError> {
        let dir = cache_dir(data_dir);
        let partial = dir.join(PARTIAL);
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;
        Ok(Self {
            dir,
            partial,
            budget_bytes,
            rate_limit: None,
            pull_windows: Windows::default(),
            changed: std::sync::Arc::default(),
        })
    }

    /// Notifies `changed` whenever the disk the cache takes changed (a pull's bytes all
    /// arrived, a file was deleted), so the agent can tell the control plane its free disk
    /// at once.
    pub fn with_change_notice(mut self, changed: std::sync::Arc<tokio::sync::Notify>) -> Self {
        self.changed = changed;
        self
    }

    /// Caps pulls at `bytes_per_second` (none: as fast as the network allows).
    pub fn with_rate_limit(mut self, bytes_per_second: Option<u64>) -> Self {
        self.rate_limit = bytes_per_second.filter(|&r| r > 0);
        self
    }

    /// Pulls let the control plane send `windows` ahead of what was read.
    pub fn with_pull_windows(mut self, windows: Windows) -> Self {
        self.pull_windows = windows;
        self
    }

    pub fn pull_windows(&self) -> Windows {
        self.pull_windows
    }

    pub fn path_of(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}.gguf"))
    }

    fn partial_of(&self, digest: &str) -> PathBuf {
        self.partial.join(digest)
    }

    /// The verified file, if cached; marks it used now.
    pub fn cached(&self, digest: &str) -> Option<PathBuf> {
        let path = self.path_of(digest);
        let file = std::fs::File::options().append(true).open(&path).ok()?;
        let _ = file.set_modified(std::time::SystemTime::now());
        Some(path)
    }

    /// Bytes of `digest` already received (a resumed pull starts there).
    pub fn partial_len(&self, digest: &str) -> u64 {
        std::fs::metadata(self.partial_of(digest)).map_or(0, |m| m.len())
    }

    /// Fetches `assignment`'s artifact from where an earlier attempt stopped, then verifies
    /// and publishes it. `progress(done, total)` is called as bytes arrive. `began` is when
    /// the attempt began, before `client`'s connection was opened: the log's `pull_ms`
    /// counts from there.
    pub async fn pull(
        &self,
        client: &mut AgentServiceClient<tonic::transport::Channel>,
        assignment: &ModelAssignment,
        trust: &AgentTrustPolicy,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
        began: std::time::Instant,
    ) -> Result<PathBuf, ArtifactError> {
        let digest = Sha256Hex::parse(&assignment.digest).ok_or_else(|| {
            ArtifactError::Refused(format!("`{}` is not a sha256 digest", assignment.digest))
        })?;
        if let Some(path) = self.cached(digest.as_str()) {
            return Ok(path);
        }
        let total = assignment.size_bytes;
        let partial = self.partial_of(digest.as_str());
        let hasher = hash_partial(&partial, total).await?;
        let mut offset = hasher.len();
        let resumed_at = offset;
        progress(offset, total);
        let writer = PartialWriter::open(&partial, offset).map_err(io(&partial))?;
        let mut sink = ChunkSink::start(writer, hasher);
        // A pull from the first byte is pre-parsed as it streams; a resumed one from the file.
        let mut probe = (offset == 0).then(|| GgufProbe::start(total, Limits::default()));
        let started = std::time::Instant::now();
        // What stopped the transfer, and whether what arrived must be thrown away.
        let mut stopped: Option<(ArtifactError, bool)> = None;
        if offset < total {
            let request = FetchArtifactRequest {
                digest: digest.to_string(),
                offset,
            };
            match client.fetch_artifact(request).await {
                Err(status) => stopped = Some((interrupted(offset, &status), false)),
                Ok(response) => {
                    stopped = self
                        .receive(
                            response.into_inner(),
                            &mut sink,
                            probe.as_mut(),
                            &mut offset,
                            total,
                            progress,
                        )
                        .await;
                }
            }
        }
        let received = started.elapsed();
        // Everything received is hashed and written before anything is decided.
        let (file, hasher) = sink.finish().await.map_err(io(&partial))?;
        let drained = started.elapsed();
        if let Some((error, throw_away)) = stopped {
            if throw_away {
                drop(file);
                self.delete(&partial, "partial artifact");
            }
            return Err(error);
        }
        if offset < total {
            return Err(ArtifactError::Interrupted {
                at: offset,
                reason: "the stream ended early".into(),
            });
        }
        let got = hasher.finish();
        if got != digest {
            drop(file);
            self.delete(&partial, "partial artifact");
            return Err(ArtifactError::DigestMismatch {
                want: digest.to_string(),
                got: got.to_string(),
            });
        }
        // Every byte is on disk and the agent reports the artifact Verifying, which the
        // control plane no longer counts as pending: it is told the free disk now.
        self.changed.notify_one();
        file.sync_all().map_err(io(&partial))?;
        drop(file);
        let synced = started.elapsed();
        let streamed = match probe {
            Some(probe) => probe.finish().await,
            None => None,
        };
        if let Err(reason) = verify(&partial, streamed, assignment, &digest, trust).await {
            self.delete(&partial, "partial artifact");
            return Err(ArtifactError::Refused(reason));
        }
        let target = self.path_of(digest.as_str());
        std::fs::rename(&partial, &target).map_err(io(&target))?;
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        tracing::info!(
            %digest,
            bytes = total,
            resumed_at,
            pull_ms = began.elapsed().as_millis() as u64,
            received_ms = received.as_millis() as u64,
            drained_ms = drained.as_millis() as u64,
            synced_ms = synced.as_millis() as u64,
            cached_ms = started.elapsed().as_millis() as u64,
            "artifact verified and cached"
        );
        Ok(target)
    }

    /// Hands every chunk of `stream` to `sink` in order; returns what stopped it early
    /// (and whether the bytes must be discarded), or `None` at the end of the stream.
    async fn receive(
        &self,
        mut stream: tonic::Streaming<steward_proto::agent::v1::ArtifactChunk>,
        sink: &mut ChunkSink,
        mut probe: Option<&mut GgufProbe>,
        offset: &mut u64,
        total: u64,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Option<(ArtifactError, bool)> {
        let (started, resumed_at) = (tokio::time::Instant::now(), *offset);
        loop {
            let chunk = match stream.message().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return None,
                Err(status) => return Some((interrupted(*offset, &status), false)),
            };
            if chunk.offset != *offset {
                let reason = format!("a chunk arrived for offset {}", chunk.offset);
                return Some((
                    ArtifactError::Interrupted {
                        at: *offset,
                        reason,
                    },
                    false,
                ));
            }
            if *offset + chunk.data.len() as u64 > total {
                let reason =
                    format!("the control plane sent more than the {total} bytes announced");
                return Some((ArtifactError::Interrupted { at: 0, reason }, true));
            }
            let len = chunk.data.len() as u64;
            if let Some(probe) = probe.as_deref_mut() {
                probe.feed(chunk.data.clone()).await;
            }
            if !sink.push(chunk.data).await {
                // The writing thread stopped; `finish` reports why.
                return None;
            }
            *offset += len;
            progress(*offset, total);
            if let Some(rate) = self.rate_limit {
                let due =
                    std::time::Duration::from_secs_f64((*offset - resumed_at) as f64 / rate as f64);
                tokio::time::sleep_until(started + due).await;
            }
        }
    }

    /// Deletes an artifact (revoked) and any partial copy of it.
    pub fn remove(&self, digest: &str) {
        self.delete(&self.path_of(digest), "artifact");
        self.delete(&self.partial_of(digest), "partial artifact");
    }

    /// Deletes `path` (a `what`) if it exists, and notifies that the cache's disk changed.
    fn delete(&self, path: &Path, what: &str) {
        match std::fs::remove_file(path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "deleted {what}");
                self.changed.notify_one();
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot delete {what}"),
        }
    }

    /// Deletes least-recently-used cached artifacts not in `keep` until the cache, with
    /// `room_for` more bytes (an artifact about to be pulled), fits its budget. Never
    /// deletes one in `keep` (assigned or in use). Returns what was deleted.
    /// Partial pulls of artifacts not in `keep` are deleted too: they only take disk, and
    /// an artifact assigned again later is pulled again.
    pub fn evict(&self, keep: &BTreeSet<String>, room_for: u64) -> Vec<String> {
        self.discard_unneeded_partials(keep);
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut files: Vec<(std::time::SystemTime, u64, String)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let digest = name.strip_suffix(".gguf")?.to_owned();
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), digest))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum::<u64>() + room_for;
        files.sort();
        let mut evicted = Vec::new();
        for (_, len, digest) in files {
            if total <= self.budget_bytes {
                break;
            }
            if keep.contains(&digest) {
                continue;
            }
            self.remove(&digest);
            total = total.saturating_sub(len);
            evicted.push(digest);
        }
        evicted
    }

    fn discard_unneeded_partials(&self, keep: &BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(&self.partial) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let Ok(digest) = entry.file_name().into_string() else {
                continue;
            };
            if keep.contains(&digest) {
                continue;
            }
            self.delete(&entry.path(), "partial pull of an unassigned artifact");
        }
    }
}

fn interrupted(at: u64, status: &tonic::Status) -> ArtifactError {
    ArtifactError::Interrupted {
        at,
        reason: format!("{}: {}", status.code(), status.message()),
    }
}

/// Hashes what an earlier attempt left in `path` (creating it empty if there is none, and
/// emptying it if it is longer than the artifact), so a pull resumes after those bytes.
async fn hash_partial(path: &Path, total: u64) -> Result<StreamingDigest, ArtifactError> {
    let path_owned = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let path = path_owned;
        let file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        if file.metadata()?.len() > total {
            file.set_len(0)?;
        }
        let mut digest = StreamingDigest::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut reader = std::fs::File::open(&path)?;
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            digest.update(&buf[..n]);
        }
        if !digest.is_empty() {
            tracing::info!(path = %path.display(), bytes = digest.len(), "resuming a partial download");
        }
        Ok::<_, std::io::Error>(digest)
    })
    .await
    .map_err(|e| ArtifactError::Io {
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?
    .map_err(io(path))
}

/// Bytes gathered before one write.
const BLOCK: usize = 8 << 20;

/// Appends received bytes to a partial artifact in 8 MiB blocks through a [`DirectWriter`]
/// (`O_DIRECT` where the filesystem allows). A resumed pull carries the bytes after the last
/// aligned offset in its first block, so nothing already received is fetched again.
struct PartialWriter {
    out: DirectWriter,
    /// Bytes not yet written.
    block: AlignedBlock,
}

impl PartialWriter {
    fn open(path: &Path, len: u64) -> std::io::Result<Self> {
        let (out, tail) = DirectWriter::resume(path, len)?;
        let mut block = aligned_block(BLOCK);
        block.extend_from_slice(&tail);
        Ok(Self { out, block })
    }

    fn append(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let take = (BLOCK - self.block.len()).min(data.len());
            self.block.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.block.len() == BLOCK {
                self.out.write_block(&self.block)?;
                self.block.clear();
            }
        }
        Ok(())
    }

    /// Writes what is buffered, so the file holds every byte received.
    fn finish(mut self) -> std::io::Result<std::fs::File> {
        self.out.finish(&mut self.block)
    }
}

/// Chunks in flight to each of the sink's threads.
const SINK_QUEUE: usize = 8;

/// Hashes and appends received chunks on two blocking threads, one hashing and one writing,
/// so receiving the next chunk (TLS, HTTP/2, protobuf), hashing and writing all overlap
/// instead of taking turns. Each chunk is shared between the threads, not copied.
struct ChunkSink {
    hash_tx: Option<tokio::sync::mpsc::Sender<bytes::Bytes>>,
    write_tx: Option<tokio::sync::mpsc::Sender<bytes::Bytes>>,
    hashing: tokio::task::JoinHandle<StreamingDigest>,
    writing: tokio::task::JoinHandle<std::io::Result<std::fs::File>>,
}

impl ChunkSink {
    /// Continues `hasher` and appends through `writer`.
    fn start(mut writer: PartialWriter, mut hasher: StreamingDigest) -> Self {
        let (hash_tx, mut hash_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(SINK_QUEUE);
        let (write_tx, mut write_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(SINK_QUEUE);
        let hashing = tokio::task::spawn_blocking(move || {
            while let Some(data) = hash_rx.blocking_recv() {
                hasher.update(&data);
            }
            hasher
        });
        let writing = tokio::task::spawn_blocking(move || {
            while let Some(data) = write_rx.blocking_recv() {
                writer.append(&data)?;
            }
            writer.finish()
        });
        Self {
            hash_tx: Some(hash_tx),
            write_tx: Some(write_tx),
            hashing,
            writing,
        }
    }

    /// Queues a chunk for both threads; `false` when the writing thread has stopped.
    async fn push(&mut self, data: bytes::Bytes) -> bool {
        let (Some(hash_tx), Some(write_tx)) = (&self.hash_tx, &self.write_tx) else {
            return false;
        };
        write_tx.send(data.clone()).await.is_ok() && hash_tx.send(data).await.is_ok()
    }

    /// Waits until every queued chunk is hashed and written.
    async fn finish(mut self) -> std::io::Result<(std::fs::File, StreamingDigest)> {
        self.hash_tx.take();
        self.write_tx.take();
        let joined = |e: tokio::task::JoinError| std::io::Error::other(e.to_string());
        let file = self.writing.await.map_err(joined)??;
        let hasher = self.hashing.await.map_err(joined)?;
        Ok((file, hasher))
    }
}

/// The same checks the control plane made, made again here: the GGUF pre-parse (its verdict
/// on the streamed bytes, or else on the file at `path`) and the signature under the trust
/// policy the control plane sent.
async fn verify(
    path: &Path,
    streamed: Option<Result<GgufFacts, GgufError>>,
    assignment: &ModelAssignment,
    digest: &Sha256Hex,
    trust: &AgentTrustPolicy,
) -> Result<(), String> {
    let facts = match streamed {
        Some(verdict) => verdict,
        None => {
            let path = path.to_owned();
            tokio::task::spawn_blocking(move || inspect_file(&path, &Limits::default()))
                .await
                .map_err(|e| e.to_string())?
        }
    };
    facts.map_err(|e| format!("GGUF pre-parse: {}", steward_telemetry::chain(&e)))?;
    let policy = policy(trust);
    let bundle =
        (!assignment.signature_bundle.is_empty()).then_some(&assignment.signature_bundle[..]);
    policy
        .evaluate(
            &assignment.model_name,
            &[(assignment.file_name.clone(), digest.clone())],
            bundle,
        )
        .map(|_| ())
        .map_err(|e| format!("trust policy: {}", steward_telemetry::chain(&e)))
}

/// The wire policy as a decision policy.
pub fn policy(trust: &AgentTrustPolicy) -> Policy {
    Policy {
        anchors: trust
            .anchors
            .iter()
            .map(|a| ScopedAnchor {
                anchor: if a.kind == "certificate_root" {
                    TrustAnchor::CertificateRoot {
                        pem: a.pem.clone(),
                        identity: (!a.identity.is_empty()).then(|| a.identity.clone()),
                    }
                } else {
                    TrustAnchor::PublicKey { pem: a.pem.clone() }
                },
                name_pattern: a.name_pattern.clone(),
            })
            .collect(),
        unsigned_allowed: trust.unsigned_allowed.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(cache: &ArtifactCache, digest: &str, len: usize, age_secs: u64) {
        let path = cache.path_of(digest);
        std::fs::write(&path, vec![0u8; len]).unwrap();
        let when = std::time::SystemTime::now() - std::time::Duration::from_secs(age_secs);
        std::fs::File::options()
            .append(true)
            .open(&path)
            .unwrap()
            .set_modified(when)
            .unwrap();
    }

    #[test]
    fn a_partial_written_in_odd_chunks_and_resumed_off_alignment_keeps_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("partial");
        let source: Vec<u8> = (0..3 * BLOCK + 12_345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&path, b"").unwrap();
        // A first attempt stops off any alignment, mid-block.
        let cut = BLOCK + 5_000;
        let mut writer = PartialWriter::open(&path, 0).unwrap();
        for chunk in source[..cut].chunks(999_983) {
            writer.append(chunk).unwrap();
        }
        writer.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), source[..cut]);
        // The next resumes after those bytes and writes the rest.
        let mut writer = PartialWriter::open(&path, cut as u64).unwrap();
        for chunk in source[cut..].chunks(1 << 20) {
            writer.append(chunk).unwrap();
        }
        writer.finish().unwrap();
        assert!(std::fs::read(&path).unwrap() == source, "bytes differ");
    }

    #[test]
    fn the_listing_gives_each_cached_and_partial_artifact_with_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            listing(dir.path()).unwrap().is_none(),
            "no cache: no listing"
        );
        let cache = ArtifactCache::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(listing(dir.path()).unwrap(), Some(Vec::new()));
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        touch(&cache, &a, 100, 0);
        std::fs::write(cache.partial_of(&b), [0u8; 40]).unwrap();
        std::fs::write(cache.partial_of(&a), [0u8; 7]).unwrap();
        // Not named for a digest: not an artifact.
        std::fs::write(cache.dir.join("notes.txt"), b"x").unwrap();
        std::fs::write(cache.partial_of("not-a-digest"), b"x").unwrap();
        let listed = listing(dir.path()).unwrap().unwrap();
        let want = [(&a, 7, false), (&a, 100, true), (&b, 40, false)];
        assert_eq!(listed.len(), want.len(), "{listed:?}");
        for (got, (digest, bytes, complete)) in listed.iter().zip(want) {
            assert_eq!(
                (&got.digest, got.bytes, got.complete),
                (digest, bytes, complete)
            );
        }
    }

    #[test]
    fn eviction_removes_least_recently_used_unneeded_artifacts_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path(), 250).unwrap();
        touch(&cache, "old", 100, 300);
        touch(&cache, "older-but-kept", 100, 400);
        touch(&cache, "middle", 100, 200);
        touch(&cache, "new", 100, 100);
        let keep = BTreeSet::from(["older-but-kept".to_owned()]);
        let evicted = cache.evict(&keep, 0);
        assert_eq!(evicted, ["old", "middle"]);
        assert!(
            cache.path_of("older-but-kept").exists(),
            "needed: never evicted"
        );
        assert!(cache.path_of("new").exists());
    }

    #[test]
    fn eviction_never_deletes_a_needed_artifact_even_over_budget() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path(), 10).unwrap();
        touch(&cache, "a", 100, 10);
        let keep = BTreeSet::from(["a".to_owned()]);
        assert!(cache.evict(&keep, 0).is_empty());
        assert!(cache.evict(&keep, 1000).is_empty());
        assert!(cache.path_of("a").exists());
    }

    #[test]
    fn eviction_deletes_partial_pulls_of_unassigned_artifacts() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path(), 1 << 30).unwrap();
        std::fs::write(cache.partial_of("assigned"), b"half").unwrap();
        std::fs::write(cache.partial_of("unassigned"), b"half").unwrap();
        let keep = BTreeSet::from(["assigned".to_owned()]);
        assert!(
            cache.evict(&keep, 0).is_empty(),
            "no cached artifact evicted"
        );
        assert_eq!(cache.partial_len("assigned"), 4, "a needed partial stays");
        assert!(!cache.partial_of("unassigned").exists());
    }

    #[test]
    fn eviction_makes_room_for_an_artifact_about_to_be_pulled() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path(), 250).unwrap();
        touch(&cache, "old", 100, 300);
        touch(&cache, "new", 100, 100);
        let keep = BTreeSet::from(["incoming".to_owned()]);
        assert!(cache.evict(&keep, 0).is_empty(), "200 bytes fit in 250");
        assert_eq!(cache.evict(&keep, 120), ["old"]);
        assert!(cache.path_of("new").exists());
    }
}
