//! The content-addressed blob store under the data directory:
//! `blobs/sha256/<first two hex>/<digest>`.
//!
//! Uploads stream into `blobs/tmp/` while they are hashed; only a complete, verified upload is
//! fsynced and renamed into place, so a cut-off upload never leaves a visible blob. A second
//! upload of the same bytes finds the blob already there and drops its temporary copy.

use std::path::{Path, PathBuf};

use steward_artifact::digest::{Sha256Hex, StreamingDigest};
use steward_artifact::direct_write::{AlignedBlock as Block, DirectWriter, aligned_block};

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob store I/O at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the upload exceeds the maximum artifact size of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the upload was {actual} bytes but announced {announced}")]
    SizeMismatch { announced: u64, actual: u64 },
}

#[derive(Clone, Debug)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// Opens (creating) the store and clears temporary files left by interrupted uploads.
    pub fn open(data_dir: &Path) -> Result<Self, BlobError> {
        let root = data_dir.join("blobs");
        let tmp = root.join("tmp");
        std::fs::create_dir_all(root.join("sha256")).map_err(|source| BlobError::Io {
            path: root.clone(),
            source,
        })?;
        if tmp.exists() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        std::fs::create_dir_all(&tmp).map_err(|source| BlobError::Io {
            path: tmp.clone(),
            source,
        })?;
        Ok(Self { root })
    }

    pub fn path_of(&self, digest: &Sha256Hex) -> PathBuf {
        let hex = digest.as_str();
        self.root.join("sha256").join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, digest: &Sha256Hex) -> bool {
        self.path_of(digest).is_file()
    }

    /// Starts an upload of at most `max_bytes`.
    ///
    /// The receiving task copies incoming bytes into page-aligned 8 MiB blocks from a small
    /// recycled pool (so the network buffers are released at once and no fresh pages are
    /// faulted in per chunk); one blocking thread hashes each block and hands it to a second
    /// that writes it. Receiving, hashing and writing overlap: the disk and sha256 run at
    /// similar speeds, so doing both on one thread halved the upload rate.
    pub async fn begin(&self, max_bytes: u64) -> Result<Upload, BlobError> {
        let path = self
            .root
            .join("tmp")
            .join(format!("{}.partial", uuid::Uuid::new_v4()));
        let out = DirectWriter::create_new(&path).map_err(|source| BlobError::Io {
            path: path.clone(),
            source,
        })?;
        let (full_tx, full_rx) = tokio::sync::mpsc::channel::<Block>(POOL);
        let (free_tx, free_rx) = tokio::sync::mpsc::channel::<Block>(POOL);
        for _ in 1..POOL {
            let _ = free_tx.try_send(aligned_block(BLOCK));
        }
        let writer_path = path.clone();
        let writer = tokio::task::spawn_blocking(move || {
            hash_and_write(full_rx, free_tx, out).map_err(|source| BlobError::Io {
                path: writer_path,
                source,
            })
        });
        Ok(Upload {
            store: self.clone(),
            current: Some(aligned_block(BLOCK)),
            free: free_rx,
            full: Some(full_tx),
            writer: Some(writer),
            path,
            received: 0,
            max_bytes,
        })
    }

    /// Copies a local file in (for imports), hashing as it goes.
    pub async fn ingest_file(&self, source: &Path, max_bytes: u64) -> Result<Staged, BlobError> {
        use tokio::io::AsyncReadExt;
        let mut file = tokio::fs::File::open(source)
            .await
            .map_err(|e| BlobError::Io {
                path: source.to_owned(),
                source: e,
            })?;
        let mut upload = self.begin(max_bytes).await?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).await.map_err(|e| BlobError::Io {
                path: source.to_owned(),
                source: e,
            })?;
            if n == 0 {
                break;
            }
            upload.write(&buf[..n]).await?;
        }
        let len = upload.len();
        upload.finish(len).await
    }
}

const BLOCK: usize = 8 << 20;
/// Blocks per upload: one being filled, one being hashed, one being written, one queued.
const POOL: usize = 4;

/// The two blocking stages of an upload: this thread hashes each block as it arrives, a
/// scoped thread writes the hashed blocks in order and returns them to the pool. Ends when
/// the partial final block has been written and the file synced, or when the upload is
/// dropped (the channel closes) or the write fails.
fn hash_and_write(
    mut full: tokio::sync::mpsc::Receiver<Block>,
    free: tokio::sync::mpsc::Sender<Block>,
    mut out: DirectWriter,
) -> std::io::Result<StreamingDigest> {
    let (hashed_tx, hashed_rx) = std::sync::mpsc::sync_channel::<Block>(POOL);
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> std::io::Result<()> {
            while let Ok(mut block) = hashed_rx.recv() {
                if block.len() < BLOCK {
                    // Only the final block is partial.
                    return out.finish(&mut block)?.sync_all();
                }
                out.write_block(&block)?;
                block.clear();
                // The upload may be gone; then nobody needs the block back.
                let _ = free.blocking_send(block);
            }
            Err(std::io::Error::other(
                "the upload ended without its final block",
            ))
        });
        let mut digest = StreamingDigest::new();
        while let Some(block) = full.blocking_recv() {
            digest.update(&block);
            let last = block.len() < BLOCK;
            if hashed_tx.send(block).is_err() || last {
                break;
            }
        }
        drop(hashed_tx);
        writer
            .join()
            .map_err(|_| std::io::Error::other("blob writer thread panicked"))??;
        Ok(digest)
    })
}

/// An upload in progress. Dropping it without [`Upload::finish`] deletes the partial file.
#[derive(Debug)]
pub struct Upload {
    store: BlobStore,
    current: Option<Block>,
    free: tokio::sync::mpsc::Receiver<Block>,
    full: Option<tokio::sync::mpsc::Sender<Block>>,
    writer: Option<tokio::task::JoinHandle<Result<StreamingDigest, BlobError>>>,
    path: PathBuf,
    received: u64,
    max_bytes: u64,
}

impl Upload {
    pub fn len(&self) -> u64 {
        self.received
    }

    pub fn is_empty(&self) -> bool {
        self.received == 0
    }

    pub async fn write(&mut self, mut chunk: &[u8]) -> Result<(), BlobError> {
        if self.received + chunk.len() as u64 > self.max_bytes {
            return Err(BlobError::TooLarge {
                limit: self.max_bytes,
            });
        }
        self.received += chunk.len() as u64;
        while !chunk.is_empty() {
            let Some(block) = self.current.as_mut() else {
                return Err(self.writer_failed().await);
            };
            let take = (BLOCK - block.len()).min(chunk.len());
            block.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if block.len() == BLOCK {
                let full = self.current.take();
                let sent = match (&self.full, full) {
                    (Some(sender), Some(full)) => sender.send(full).await.is_ok(),
                    _ => false,
                };
                self.current = if sent { self.free.recv().await } else { None };
                if self.current.is_none() {
                    return Err(self.writer_failed().await);
                }
            }
        }
        Ok(())
    }

    /// The writer stopped early: its error, or a generic one.
    async fn writer_failed(&mut self) -> BlobError {
        self.full = None;
        match self.join_writer().await {
            Err(e) => e,
            Ok(_) => BlobError::Io {
                path: self.path.clone(),
                source: std::io::Error::other("blob writer stopped early"),
            },
        }
    }

    async fn join_writer(&mut self) -> Result<StreamingDigest, BlobError> {
        let writer = self.writer.take().ok_or_else(|| BlobError::Io {
            path: self.path.clone(),
            source: std::io::Error::other("blob writer already finished"),
        })?;
        writer.await.map_err(|e| BlobError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?
    }

    /// Waits for the bytes to be hashed, written and fsynced, and checks the size; the blob
    /// is not visible yet.
    pub async fn finish(mut self, announced: u64) -> Result<Staged, BlobError> {
        if let (Some(sender), Some(last)) = (self.full.take(), self.current.take()) {
            // A partial (possibly empty) final block ends the stream.
            let _ = sender.send(last).await;
        }
        let digest = self.join_writer().await?;
        let actual = digest.len();
        if actual != announced {
            return Err(BlobError::SizeMismatch { announced, actual });
        }
        let path = std::mem::take(&mut self.path);
        Ok(Staged {
            store: self.store.clone(),
            digest: digest.finish(),
            size: actual,
            path,
            committed: false,
        })
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.full = None;
        if let Some(writer) = self.writer.take() {
            writer.abort();
        }
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// [`prefetch`] asks the page cache to hold at most 1/N of the machine's RAM.
const PREFETCH_RAM_DIVISOR: u64 = 8;

/// Asks the kernel, in the background, to read a just-accepted blob (its first
/// 1/[`PREFETCH_RAM_DIVISOR`] of the machine's RAM, for a very large one) into the page cache.
/// Blobs are written with `O_DIRECT`, so without this the first agent to pull a new model
/// would wait on the disk read and the page-cache fill (measured: the first pull after a
/// push ran 15–20% slower than later ones). Best effort: the kernel may evict it again, and
/// a failure only costs that first pull its speed.
pub fn prefetch(path: PathBuf, len: u64) {
    tokio::task::spawn_blocking(move || {
        #[cfg(target_os = "linux")]
        {
            use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
            let ram = nix::sys::sysinfo::sysinfo().map_or(0, |s| s.ram_total());
            let len = len.min(ram / PREFETCH_RAM_DIVISOR);
            // Linux reads at most one readahead window (a few MiB) per WILLNEED call, so
            // the range is advised window by window; each call only queues the reads.
            const STEP: u64 = 8 << 20;
            let advised = std::fs::File::open(&path)
                .map_err(|e| e.to_string())
                .and_then(|f| {
                    (0..len).step_by(STEP as usize).try_for_each(|at| {
                        let (at, n) = (at as i64, STEP.min(len - at) as i64);
                        posix_fadvise(&f, at, n, PosixFadviseAdvice::POSIX_FADV_WILLNEED)
                            .map_err(|e| e.to_string())
                    })
                });
            if let Err(e) = advised {
                tracing::debug!(path = %path.display(), error = %e, "blob prefetch skipped");
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (path, len);
    });
}

/// A complete upload waiting to be checked. [`Staged::commit`] publishes it; dropping it
/// deletes it.
#[derive(Debug)]
pub struct Staged {
    store: BlobStore,
    pub digest: Sha256Hex,
    pub size: u64,
    path: PathBuf,
    committed: bool,
}

impl Staged {
    /// Where the staged bytes are, for checks that read them (the GGUF pre-parse).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the upload into its content address (or drops it if that blob exists) and
    /// fsyncs the directory. Returns the blob's path.
    pub async fn commit(mut self) -> Result<PathBuf, BlobError> {
        let target = self.store.path_of(&self.digest);
        let dir = target.parent().map(Path::to_owned).unwrap_or_default();
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| BlobError::Io { path, source }
        };
        tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
        if tokio::fs::try_exists(&target).await.map_err(io(&target))? {
            tokio::fs::remove_file(&self.path)
                .await
                .map_err(io(&self.path))?;
        } else {
            tokio::fs::rename(&self.path, &target)
                .await
                .map_err(io(&target))?;
            tokio::fs::File::open(&dir)
                .await
                .map_err(io(&dir))?
                .sync_all()
                .await
                .map_err(io(&dir))?;
        }
        self.committed = true;
        Ok(target)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_committed_upload_is_addressed_by_its_digest_and_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        for _ in 0..2 {
            let mut up = store.begin(1024).await.unwrap();
            up.write(b"ab").await.unwrap();
            up.write(b"c").await.unwrap();
            let staged = up.finish(3).await.unwrap();
            assert_eq!(
                staged.digest.as_str(),
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
            );
            let path = staged.commit().await.unwrap();
            assert_eq!(std::fs::read(path).unwrap(), b"abc");
        }
        let tmp_left = std::fs::read_dir(dir.path().join("blobs/tmp"))
            .unwrap()
            .count();
        assert_eq!(tmp_left, 0, "no temporary files remain");
    }

    #[tokio::test]
    async fn a_cut_off_upload_leaves_no_visible_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let mut up = store.begin(1024).await.unwrap();
        up.write(b"partial").await.unwrap();
        drop(up);
        let mut up = store.begin(1024).await.unwrap();
        up.write(b"abc").await.unwrap();
        let err = up.finish(10).await.unwrap_err();
        assert!(matches!(
            err,
            BlobError::SizeMismatch {
                announced: 10,
                actual: 3
            }
        ));
        assert_eq!(
            std::fs::read_dir(dir.path().join("blobs/tmp"))
                .unwrap()
                .count(),
            0
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("blobs/sha256"))
                .unwrap()
                .count(),
            0
        );
    }

    #[tokio::test]
    async fn uploads_spanning_many_blocks_in_odd_chunks_keep_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..(2 * BLOCK + 12_345))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let mut up = store.begin(u64::MAX).await.unwrap();
        for chunk in data.chunks(777_777) {
            up.write(chunk).await.unwrap();
        }
        let staged = up.finish(data.len() as u64).await.unwrap();
        let (expected, _) = steward_artifact::digest::sha256_reader(&data[..]).unwrap();
        assert_eq!(staged.digest, expected);
        let path = staged.commit().await.unwrap();
        assert_eq!(std::fs::read(path).unwrap(), data);
    }

    #[tokio::test]
    async fn uploads_over_the_limit_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let mut up = store.begin(4).await.unwrap();
        up.write(b"abcd").await.unwrap();
        assert!(matches!(
            up.write(b"e").await,
            Err(BlobError::TooLarge { limit: 4 })
        ));
    }
}
