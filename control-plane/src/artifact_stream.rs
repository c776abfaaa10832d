//! The chunks of one artifact download, read from the blob file as the response is polled.
//!
//! A chunk whose bytes all lie in the page cache (the usual case: the artifact was pushed or
//! sent not long ago) is read right in the stream's poll with `preadv2(RWF_NOWAIT)`, which
//! returns at once instead of waiting for the disk. A reader thread that handed every chunk
//! over cost a wake-up per chunk, and the chunk was no longer in cache when it was encoded:
//! reading in the poll cut the control plane's CPU per download by 5–10 %
//! (docs/BENCHMARKS.md). Whatever is not cached is read on a blocking thread, so a cold file
//! never stalls a runtime worker and the agent sessions it serves.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use rustix::io::{Errno, ReadWriteFlags};

use crate::file_chunks::ChunkBuffers;

/// Chunks of `chunk` bytes (fewer only at the end of the file) with the offset of each.
pub struct ArtifactStream {
    file: Arc<File>,
    offset: u64,
    buffers: ChunkBuffers,
    /// A chunk being finished on a blocking thread: the buffer and how much of it is filled.
    reading: Option<tokio::task::JoinHandle<io::Result<(BytesMut, usize)>>>,
    /// Whether a read is tried without waiting first; off where the filesystem refuses it.
    nowait: bool,
    done: bool,
    /// How many reads were made on a blocking thread.
    off_thread: u64,
}

impl ArtifactStream {
    /// Streams `file` from `offset` to its end.
    pub fn new(file: File, offset: u64, chunk: usize) -> Self {
        Self {
            file: Arc::new(file),
            offset,
            buffers: ChunkBuffers::new(chunk),
            reading: None,
            nowait: true,
            done: false,
            off_thread: 0,
        }
    }

    /// The same stream with every read on a blocking thread, as where the filesystem does
    /// not support reads that do not wait.
    #[cfg(test)]
    fn always_off_thread(mut self) -> Self {
        self.nowait = false;
        self
    }

    /// How many reads were made on a blocking thread.
    #[cfg(test)]
    fn reads_off_thread(&self) -> u64 {
        self.off_thread
    }

    /// Reads what the page cache holds of the next chunk into `buf` from `filled` on;
    /// `Ok(true)` when the rest must be read on a blocking thread.
    fn read_cached(&mut self, buf: &mut [u8], filled: &mut usize) -> io::Result<bool> {
        while self.nowait && *filled < buf.len() {
            let at = self.offset + *filled as u64;
            let mut slices = [io::IoSliceMut::new(&mut buf[*filled..])];
            match rustix::io::preadv2(&*self.file, &mut slices, at, ReadWriteFlags::NOWAIT) {
                Ok(0) => return Ok(false),
                Ok(n) => *filled += n,
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => return Ok(true),
                Err(Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS) => self.nowait = false,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(*filled < buf.len())
    }

    fn fail(&mut self, error: io::Error) -> Poll<Option<io::Result<(u64, Bytes)>>> {
        self.done = true;
        Poll::Ready(Some(Err(error)))
    }
}

impl futures::Stream for ArtifactStream {
    type Item = io::Result<(u64, Bytes)>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let (buf, filled) = match &mut this.reading {
            Some(reading) => {
                let joined = ready!(Pin::new(reading).poll(cx));
                this.reading = None;
                match joined {
                    Ok(Ok(read)) => read,
                    Ok(Err(e)) => return this.fail(e),
                    Err(e) => return this.fail(io::Error::other(e)),
                }
            }
            None => {
                let mut buf = this.buffers.take();
                let mut filled = 0;
                match this.read_cached(&mut buf, &mut filled) {
                    Err(e) => return this.fail(e),
                    Ok(false) => (buf, filled),
                    Ok(true) => {
                        this.off_thread += 1;
                        let (file, at) = (this.file.clone(), this.offset);
                        this.reading = Some(tokio::task::spawn_blocking(move || {
                            read_rest(&file, buf, filled, at)
                        }));
                        return self.poll_next(cx);
                    }
                }
            }
        };
        if filled == 0 {
            this.done = true;
            return Poll::Ready(None);
        }
        let at = this.offset;
        this.offset += filled as u64;
        Poll::Ready(Some(Ok((at, this.buffers.hand_out(buf, filled)))))
    }
}

/// Chunks the kernel is asked to start reading ahead of a chunk that had to wait for the
/// disk, so the next ones are in the page cache (or on their way) by the time they are sent.
const READ_AHEAD_CHUNKS: u64 = 4;

/// Fills `buf` from `filled` on with the file's bytes from `at + filled`, waiting for the
/// disk; stops early only at the end of the file. First asks the kernel to read the next
/// [`READ_AHEAD_CHUNKS`] chunks in the background.
fn read_rest(
    file: &File,
    mut buf: BytesMut,
    mut filled: usize,
    at: u64,
) -> io::Result<(BytesMut, usize)> {
    let chunk = buf.len() as u64;
    if let (Ok(ahead), Ok(len)) = (
        i64::try_from(at + chunk),
        i64::try_from(READ_AHEAD_CHUNKS * chunk),
    ) {
        // Advice only: without it the reads just wait longer.
        let _ = nix::fcntl::posix_fadvise(
            file,
            ahead,
            len,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        );
    }
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], at + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((buf, filled))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    fn file_of(data: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        io::Write::write_all(&mut file, data).unwrap();
        file
    }

    async fn collect(stream: &mut ArtifactStream) -> Vec<(u64, Bytes)> {
        let mut chunks = Vec::new();
        while let Some(chunk) = stream.next().await {
            chunks.push(chunk.unwrap());
        }
        chunks
    }

    fn data() -> Vec<u8> {
        (0..10_000u32).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn cached_file_streams_every_byte_in_order_without_a_blocking_thread() {
        let data = data();
        let file = file_of(&data);
        let mut stream = ArtifactStream::new(File::open(file.path()).unwrap(), 1000, 4096);
        let chunks = collect(&mut stream).await;
        let offsets: Vec<u64> = chunks.iter().map(|c| c.0).collect();
        assert_eq!(offsets, [1000, 5096, 9192]);
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.1.iter().copied()).collect();
        assert_eq!(joined, data[1000..]);
        assert_eq!(
            stream.reads_off_thread(),
            0,
            "a file just written is in the page cache"
        );
    }

    #[tokio::test]
    async fn reads_that_must_wait_are_made_on_a_blocking_thread_with_the_same_bytes() {
        let data = data();
        let file = file_of(&data);
        let mut stream =
            ArtifactStream::new(File::open(file.path()).unwrap(), 0, 4096).always_off_thread();
        let chunks = collect(&mut stream).await;
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.1.iter().copied()).collect();
        assert_eq!(joined, data);
        assert_eq!(
            chunks.iter().map(|c| c.0).collect::<Vec<_>>(),
            [0, 4096, 8192]
        );
        // Three chunks, and the read that found the end of the file.
        assert_eq!(stream.reads_off_thread(), 4);
    }

    #[tokio::test]
    async fn a_file_evicted_from_the_page_cache_is_read_off_thread() {
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
        // Beside the sources, not in a temporary directory that may be tmpfs, whose pages
        // cannot be evicted.
        let mut file = tempfile::NamedTempFile::new_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        io::Write::write_all(&mut file, &data).unwrap();
        file.as_file().sync_all().unwrap();
        let reader = File::open(file.path()).unwrap();
        nix::fcntl::posix_fadvise(
            &reader,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        let mut stream = ArtifactStream::new(reader, 0, 1 << 20);
        let chunks = collect(&mut stream).await;
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.1.iter().copied()).collect();
        assert_eq!(joined, data);
        assert!(
            stream.reads_off_thread() > 0,
            "no chunk waited for the disk: was the file evicted?"
        );
    }

    #[tokio::test]
    async fn an_offset_at_the_end_gives_an_empty_stream() {
        let data = data();
        let file = file_of(&data);
        let mut stream = ArtifactStream::new(File::open(file.path()).unwrap(), 10_000, 4096);
        assert!(collect(&mut stream).await.is_empty());
    }
}
