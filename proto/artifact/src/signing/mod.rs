//! OpenSSF model signing (being written).
