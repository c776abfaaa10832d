//! Writing artifact bytes to disk, the way both the control plane's blob store (pushes) and
//! the agent's cache (pulls) write them. Where the filesystem allows, the file is opened with
//! `O_DIRECT` and written from page-aligned blocks: copying a model into the page cache cost
//! more CPU than hashing it (it dominated push and pull profiles), and the bytes must reach
//! the disk before the file is published anyway. Elsewhere (e.g. tmpfs) writes are plain.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Alignment `O_DIRECT` needs for file offsets, lengths and buffers.
pub const DIRECT_ALIGN: usize = 4096;

/// A page-aligned buffer of bytes to write.
pub type AlignedBlock = aligned_vec::AVec<u8, aligned_vec::ConstAlign<DIRECT_ALIGN>>;

/// An empty [`AlignedBlock`] with room for `capacity` bytes.
pub fn aligned_block(capacity: usize) -> AlignedBlock {
    AlignedBlock::with_capacity(DIRECT_ALIGN, capacity)
}

/// A file being written block by block, with `O_DIRECT` where the filesystem supports it.
#[derive(Debug)]
pub struct DirectWriter {
    file: File,
    direct: bool,
    /// Bytes written so far (the file's length once finished).
    len: u64,
}

fn is_unsupported(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

impl DirectWriter {
    /// Creates the file at `path`, which must not exist yet.
    pub fn create_new(path: &Path) -> std::io::Result<Self> {
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        match direct {
            Ok(file) => Ok(Self {
                file,
                direct: true,
                len: 0,
            }),
            Err(e) if is_unsupported(&e) => {
                // Some kernels create the file before refusing the flag.
                let _ = std::fs::remove_file(path);
                Ok(Self {
                    file: File::create_new(path)?,
                    direct: false,
                    len: 0,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Reopens the file at `path`, which holds `len` bytes, to write after them. A direct
    /// writer resumes at the last aligned offset below `len`; the bytes from there to `len`
    /// are returned, to be written again at the start of the next block, so nothing already
    /// held has to be fetched again.
    pub fn resume(path: &Path, len: u64) -> std::io::Result<(Self, Vec<u8>)> {
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        match direct {
            Ok(mut file) => {
                let aligned = len - len % DIRECT_ALIGN as u64;
                let mut tail = vec![0u8; (len - aligned) as usize];
                if !tail.is_empty() {
                    let mut reader = File::open(path)?;
                    reader.seek(SeekFrom::Start(aligned))?;
                    reader.read_exact(&mut tail)?;
                }
                file.seek(SeekFrom::Start(aligned))?;
                let writer = Self {
                    file,
                    direct: true,
                    len: aligned,
                };
                Ok((writer, tail))
            }
            Err(e) if is_unsupported(&e) => {
                let file = std::fs::OpenOptions::new().append(true).open(path)?;
                let writer = Self {
                    file,
                    direct: false,
                    len,
                };
                Ok((writer, Vec::new()))
            }
            Err(e) => Err(e),
        }
    }

    /// Whether writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Writes a full block: all but the last block must hold a multiple of [`DIRECT_ALIGN`]
    /// bytes.
    pub fn write_block(&mut self, block: &AlignedBlock) -> std::io::Result<()> {
        debug_assert!(!self.direct || block.len().is_multiple_of(DIRECT_ALIGN));
        self.len += block.len() as u64;
        self.file.write_all(block)
    }

    /// Writes the last bytes (a direct writer pads them to the alignment, then cuts the file
    /// back to the bytes written) and returns the file, not yet synced.
    pub fn finish(mut self, last: &mut AlignedBlock) -> std::io::Result<File> {
        if last.is_empty() {
            return Ok(self.file);
        }
        let len = last.len();
        self.len += len as u64;
        if self.direct {
            last.resize(len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN, 0);
            self.file.write_all(last)?;
            self.file.set_len(self.len)?;
        } else {
            self.file.write_all(last)?;
        }
        Ok(self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    fn block(data: &[u8]) -> AlignedBlock {
        let mut b = aligned_block(data.len());
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn a_file_written_in_blocks_holds_exactly_the_bytes_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data = bytes(3 * DIRECT_ALIGN + 123);
        let mut out = DirectWriter::create_new(&path).unwrap();
        out.write_block(&block(&data[..2 * DIRECT_ALIGN])).unwrap();
        let file = out.finish(&mut block(&data[2 * DIRECT_ALIGN..])).unwrap();
        file.sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert!(
            DirectWriter::create_new(&path).is_err(),
            "an existing file is never overwritten"
        );
    }

    #[test]
    fn a_resumed_file_continues_after_the_bytes_it_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("partial");
        let data = bytes(5 * DIRECT_ALIGN + 77);
        let held = DIRECT_ALIGN + 1000;
        std::fs::write(&path, &data[..held]).unwrap();
        let (mut out, tail) = DirectWriter::resume(&path, held as u64).unwrap();
        let mut next = block(&tail);
        next.extend_from_slice(&data[held..]);
        if out.is_direct() {
            assert_eq!(
                tail,
                &data[DIRECT_ALIGN..held],
                "the unaligned tail is carried"
            );
        } else {
            assert!(tail.is_empty());
        }
        // Write whole aligned blocks, then the rest.
        let whole = next.len() - next.len() % DIRECT_ALIGN;
        out.write_block(&block(&next[..whole])).unwrap();
        out.finish(&mut block(&next[whole..])).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }
}
