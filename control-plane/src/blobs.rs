//! The content-addressed blob store under the data directory:
//! `blobs/sha256/<first two hex>/<digest>`.
//!
//! Uploads stream into `blobs/tmp/` while they are hashed; only a complete, verified upload is
//! fsynced and renamed into place, so a cut-off upload never leaves a visible blob. A second
//! upload of the same bytes finds the blob already there and drops its temporary copy.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use steward_artifact::digest::{Sha256Hex, StreamingDigest};

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

    /// Starts an upload of at most `max_bytes`. Hashing and writing run on a blocking
    /// thread fed through a small queue, so receiving the next chunk overlaps with hashing
    /// and writing the previous one.
    pub async fn begin(&self, max_bytes: u64) -> Result<Upload, BlobError> {
        let path = self
            .root
            .join("tmp")
            .join(format!("{}.partial", uuid::Uuid::new_v4()));
        let mut out = BlobWriter::create(&path).map_err(|source| BlobError::Io {
            path: path.clone(),
            source,
        })?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        let writer_path = path.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let mut digest = StreamingDigest::new();
            let io = |source| BlobError::Io {
                path: writer_path.clone(),
                source,
            };
            while let Some(chunk) = rx.blocking_recv() {
                digest.update(&chunk);
                out.write(&chunk).map_err(io)?;
            }
            out.finish().map_err(io)?;
            Ok(digest)
        });
        Ok(Upload {
            store: self.clone(),
            sender: Some(tx),
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
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let n = file.read(&mut buf).await.map_err(|e| BlobError::Io {
                path: source.to_owned(),
                source: e,
            })?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            upload.write(buf).await?;
        }
        let len = upload.len();
        upload.finish(len).await
    }
}

/// Writes a blob to disk. Where the filesystem supports it, the file is opened with
/// `O_DIRECT` and written from an aligned buffer: copying gigabytes into the page cache costs
/// more CPU than hashing them (it dominated push profiles), and the bytes must reach the disk
/// before the blob is published anyway. Elsewhere (e.g. tmpfs) it falls back to plain writes.
struct BlobWriter {
    file: std::fs::File,
    /// `Some` in direct mode: the aligned staging buffer.
    direct: Option<aligned_vec::AVec<u8, aligned_vec::ConstAlign<DIRECT_ALIGN>>>,
    len: u64,
}

const DIRECT_ALIGN: usize = 4096;
const DIRECT_BUFFER: usize = 8 << 20;

impl BlobWriter {
    fn create(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        match direct {
            Ok(file) => Ok(Self {
                file,
                direct: Some(aligned_vec::AVec::with_capacity(
                    DIRECT_ALIGN,
                    DIRECT_BUFFER,
                )),
                len: 0,
            }),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let _ = std::fs::remove_file(path);
                Ok(Self {
                    file: std::fs::File::create_new(path)?,
                    direct: None,
                    len: 0,
                })
            }
            Err(e) => Err(e),
        }
    }

    fn write(&mut self, mut chunk: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.len += chunk.len() as u64;
        let Some(buf) = self.direct.as_mut() else {
            return self.file.write_all(chunk);
        };
        while !chunk.is_empty() {
            let take = (DIRECT_BUFFER - buf.len()).min(chunk.len());
            buf.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if buf.len() == DIRECT_BUFFER {
                self.file.write_all(buf)?;
                buf.clear();
            }
        }
        Ok(())
    }

    /// Writes what is buffered (padded to the block size, then truncated back) and syncs.
    fn finish(mut self) -> std::io::Result<()> {
        use std::io::Write;
        if let Some(buf) = self.direct.as_mut()
            && !buf.is_empty()
        {
            let padded = buf.len().div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
            buf.resize(padded, 0);
            self.file.write_all(buf)?;
            self.file.set_len(self.len)?;
        }
        self.file.sync_all()
    }
}

/// An upload in progress. Dropping it without [`Upload::finish`] deletes the partial file.
#[derive(Debug)]
pub struct Upload {
    store: BlobStore,
    sender: Option<tokio::sync::mpsc::Sender<Bytes>>,
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

    pub async fn write(&mut self, chunk: impl Into<Bytes>) -> Result<(), BlobError> {
        let chunk = chunk.into();
        if self.received + chunk.len() as u64 > self.max_bytes {
            return Err(BlobError::TooLarge {
                limit: self.max_bytes,
            });
        }
        self.received += chunk.len() as u64;
        let sent = match &self.sender {
            Some(sender) => sender.send(chunk).await.is_ok(),
            None => false,
        };
        if !sent {
            // The writer stopped early: report its error.
            self.sender = None;
            return Err(self
                .join_writer()
                .await
                .err()
                .unwrap_or_else(|| BlobError::Io {
                    path: self.path.clone(),
                    source: std::io::Error::other("blob writer stopped"),
                }));
        }
        Ok(())
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
        self.sender = None;
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
        self.sender = None;
        if let Some(writer) = self.writer.take() {
            writer.abort();
        }
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
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
            up.write(&b"ab"[..]).await.unwrap();
            up.write(&b"c"[..]).await.unwrap();
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
        up.write(&b"partial"[..]).await.unwrap();
        drop(up);
        let mut up = store.begin(1024).await.unwrap();
        up.write(&b"abc"[..]).await.unwrap();
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
    async fn uploads_over_the_limit_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let mut up = store.begin(4).await.unwrap();
        up.write(&b"abcd"[..]).await.unwrap();
        assert!(matches!(
            up.write(&b"e"[..]).await,
            Err(BlobError::TooLarge { limit: 4 })
        ));
    }
}
