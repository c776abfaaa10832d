//! Strict GGUF reader (being written).
