//! Reading a file as a stream of `Bytes` chunks for gRPC messages (pushes from the CLI,
//! artifact downloads to agents) without a fresh, zeroed buffer per chunk.

use std::io::Read;

/// Reads a file into chunks of a fixed size, each in a [`ChunkBuffers`] buffer.
pub struct FileChunks<R> {
    source: R,
    buffers: ChunkBuffers,
}

impl<R: Read> FileChunks<R> {
    pub fn new(source: R, size: usize) -> Self {
        Self {
            source,
            buffers: ChunkBuffers::new(size),
        }
    }

    /// The next chunk: `size` bytes, fewer only at the end; `None` once the source is done.
    pub fn next_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        let mut buf = self.buffers.take();
        let mut filled = 0;
        while filled < buf.len() {
            match self.source.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(None);
        }
        Ok(Some(self.buffers.hand_out(buf, filled)))
    }
}

/// Buffers of a fixed size for chunks. A chunk's buffer is reused once everything that was
/// handed it (tonic encodes it and drops the message) has let go, so a transfer cycles
/// through a few warm buffers instead of faulting in and zeroing a new one per chunk.
pub struct ChunkBuffers {
    size: usize,
    sent: std::collections::VecDeque<bytes::Bytes>,
}

/// How many sent chunks are remembered for reuse; older ones still held are let go.
const REMEMBERED: usize = 16;

impl ChunkBuffers {
    pub fn new(size: usize) -> Self {
        assert!(size > 0, "chunk size must be positive");
        Self {
            size,
            sent: std::collections::VecDeque::new(),
        }
    }

    /// A buffer of `size` bytes to fill: a released one if there is one, else a new one.
    pub fn take(&mut self) -> bytes::BytesMut {
        let mut buf = match self.sent.pop_front().map(bytes::Bytes::try_into_mut) {
            Some(Ok(reused)) => reused,
            Some(Err(still_held)) => {
                self.sent.push_front(still_held);
                bytes::BytesMut::zeroed(self.size)
            }
            None => bytes::BytesMut::zeroed(self.size),
        };
        buf.resize(self.size, 0);
        buf
    }

    /// The first `filled` bytes of `buf` as a chunk, remembered so its buffer comes back.
    pub fn hand_out(&mut self, mut buf: bytes::BytesMut, filled: usize) -> bytes::Bytes {
        buf.truncate(filled);
        let chunk = buf.freeze();
        self.sent.push_back(chunk.clone());
        if self.sent.len() > REMEMBERED {
            self.sent.pop_front();
        }
        chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_byte_in_order_and_reuse_released_buffers() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut chunks = FileChunks::new(&data[..], 4096);
        let first = chunks.next_chunk().unwrap().unwrap();
        let first_ptr = first.as_ptr();
        assert_eq!(&first[..], &data[..4096]);
        drop(first);
        let second = chunks.next_chunk().unwrap().unwrap();
        assert_eq!(second.as_ptr(), first_ptr, "the released buffer is reused");
        assert_eq!(&second[..], &data[4096..8192]);
        let third = chunks.next_chunk().unwrap().unwrap();
        assert_ne!(
            third.as_ptr(),
            second.as_ptr(),
            "a held buffer is not overwritten"
        );
        assert_eq!(&third[..], &data[8192..]);
        assert_eq!(&second[..], &data[4096..8192], "the held chunk is intact");
        assert!(chunks.next_chunk().unwrap().is_none());
    }
}
