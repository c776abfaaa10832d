//! Giving memory back to the operating system after a model is unloaded.
//!
//! llama.cpp allocates its host buffers (weights read without mmap, KV cache, compute buffer,
//! batches) through `malloc`. glibc keeps freed chunks in its arenas for reuse: after the
//! first large `free` it raises its mmap threshold (up to 32 MiB), so later buffers of that
//! size come from the arenas instead of `mmap`, and with transparent huge pages an arena's
//! partly free huge pages stay resident. Unloading a model would then leave tens of MiB in
//! the process per load/unload cycle, which an operator swapping models sees as a leak.

/// Asks glibc to return every free page it holds to the OS. Cheap next to a model load.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(unsafe_code, reason = "glibc's malloc_trim has no safe binding")]
pub(crate) fn return_freed_memory_to_the_os() {
    // SAFETY: malloc_trim has no caller-side preconditions; it only walks and trims glibc's
    // own arenas under their locks.
    let released = unsafe { libc::malloc_trim(0) } != 0;
    tracing::debug!(
        released,
        "returned freed heap pages to the OS after an unload"
    );
}

/// Other allocators (musl, macOS, Windows) have no such call and do not hold pages this way.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn return_freed_memory_to_the_os() {}
