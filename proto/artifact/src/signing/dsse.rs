//! DSSE (Dead Simple Signing Envelope) pre-authentication encoding.
//! <https://github.com/secure-systems-lab/dsse/blob/v1.0.0/protocol.md>

/// The only DSSE payload type model signing uses.
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// `PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, lengths in bytes
/// as ASCII decimal. This, not the payload, is what gets signed.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let header = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    );
    let mut out = Vec::with_capacity(header.len() + payload.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_the_dsse_spec_example() {
        // The test vector from the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
    }

    #[test]
    fn pae_counts_bytes_not_characters() {
        assert_eq!(
            pae(IN_TOTO_PAYLOAD_TYPE, "é".as_bytes()),
            "DSSEv1 28 application/vnd.in-toto+json 2 é".as_bytes()
        );
        assert_eq!(pae("t", b""), b"DSSEv1 1 t 0 ");
    }
}
