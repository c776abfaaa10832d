//! The Sigstore bundle (v0.3, protobuf JSON form) as `model_signing` reads and writes it for
//! key and certificate signing: no transparency log entries, a DSSE envelope.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

use super::SigningError;

/// The bundle media type `model_signing` writes and requires.
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// The same version under the newer spelling of Sigstore media types.
const BUNDLE_MEDIA_TYPE_ALT: &str = "application/vnd.dev.sigstore.bundle+json;version=0.3";

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bundle {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    verification_material: Option<VerificationMaterial>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dsse_envelope: Option<Envelope>,
    /// Only to say clearly that a plain message signature is not model signing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message_signature: Option<serde_json::Value>,
}

#[derive(Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VerificationMaterial {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    public_key: Option<PublicKeyIdentifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x509_certificate_chain: Option<CertificateChain>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    certificate: Option<Certificate>,
    /// Always empty here: verification is offline.
    #[serde(default)]
    tlog_entries: Vec<serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
struct PublicKeyIdentifier {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct CertificateChain {
    #[serde(default)]
    certificates: Vec<Certificate>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Certificate {
    /// Base64 DER.
    raw_bytes: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    /// Base64.
    #[serde(default)]
    payload: String,
    #[serde(default)]
    payload_type: String,
    #[serde(default)]
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Serialize, Deserialize)]
struct EnvelopeSignature {
    /// Base64.
    sig: String,
    #[serde(default)]
    keyid: String,
}

/// Who the bundle says signed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Material {
    /// A bare key, with the hint `model_signing` writes (absent in bundles made before 1.0).
    Key { hint: Option<String> },
    /// DER certificates, leaf first.
    Certificates(Vec<Vec<u8>>),
}

/// A bundle whose structure is sound; nothing in it is trusted yet.
#[derive(Clone, Debug)]
pub(crate) struct ParsedBundle {
    pub material: Material,
    pub payload_type: String,
    pub payload: Vec<u8>,
    pub signatures: Vec<Vec<u8>>,
}

/// Parses a bundle and checks its media type and shape. The DSSE payload type is returned for
/// the caller to check.
pub(crate) fn parse(json: &[u8]) -> Result<ParsedBundle, SigningError> {
    let malformed = |what: String| SigningError::MalformedBundle(what);
    let bundle: Bundle =
        serde_json::from_slice(json).map_err(|e| malformed(format!("not a bundle: {e}")))?;
    if bundle.media_type != BUNDLE_MEDIA_TYPE && bundle.media_type != BUNDLE_MEDIA_TYPE_ALT {
        return Err(SigningError::UnsupportedMediaType(bundle.media_type));
    }
    let Some(envelope) = bundle.dsse_envelope else {
        return Err(malformed(if bundle.message_signature.is_some() {
            "a message signature is not a model signature (no DSSE envelope)".into()
        } else {
            "no DSSE envelope".into()
        }));
    };
    let material = bundle
        .verification_material
        .ok_or_else(|| malformed("no verification material".into()))?;

    let material = match (
        material.public_key,
        material.x509_certificate_chain,
        material.certificate,
    ) {
        (Some(key), None, None) => Material::Key {
            hint: key.hint.filter(|hint| !hint.is_empty()),
        },
        (None, Some(chain), None) => {
            if chain.certificates.is_empty() {
                return Err(malformed("the certificate chain is empty".into()));
            }
            Material::Certificates(
                chain
                    .certificates
                    .iter()
                    .map(|cert| decode_base64(&cert.raw_bytes, "certificate"))
                    .collect::<Result<_, _>>()?,
            )
        }
        (None, None, Some(cert)) => {
            Material::Certificates(vec![decode_base64(&cert.raw_bytes, "certificate")?])
        }
        (None, None, None) => {
            return Err(malformed(
                "no public key or certificate in the verification material".into(),
            ));
        }
        _ => {
            return Err(malformed(
                "the verification material names more than one kind of signer".into(),
            ));
        }
    };
    Ok(ParsedBundle {
        material,
        payload: decode_base64(&envelope.payload, "payload")?,
        payload_type: envelope.payload_type,
        signatures: envelope
            .signatures
            .iter()
            .map(|s| decode_base64(&s.sig, "signature"))
            .collect::<Result<_, _>>()?,
    })
}

/// Writes a bundle the way `model_signing` does (compact JSON, empty `tlogEntries`, empty
/// `keyid`).
pub(crate) fn encode(
    material: &Material,
    payload_type: &str,
    payload: &[u8],
    signature: &[u8],
) -> Vec<u8> {
    let verification_material = match material {
        Material::Key { hint } => VerificationMaterial {
            public_key: Some(PublicKeyIdentifier { hint: hint.clone() }),
            ..Default::default()
        },
        Material::Certificates(chain) => VerificationMaterial {
            x509_certificate_chain: Some(CertificateChain {
                certificates: chain
                    .iter()
                    .map(|der| Certificate {
                        raw_bytes: STANDARD.encode(der),
                    })
                    .collect(),
            }),
            ..Default::default()
        },
    };
    let bundle = Bundle {
        media_type: BUNDLE_MEDIA_TYPE.into(),
        verification_material: Some(verification_material),
        dsse_envelope: Some(Envelope {
            payload: STANDARD.encode(payload),
            payload_type: payload_type.into(),
            signatures: vec![EnvelopeSignature {
                sig: STANDARD.encode(signature),
                keyid: String::new(),
            }],
        }),
        message_signature: None,
    };
    // Plain strings and vectors always serialize.
    serde_json::to_vec(&bundle).expect("a bundle serializes")
}

/// Protobuf JSON `bytes`: standard or URL-safe base64, padded or not.
fn decode_base64(text: &str, what: &str) -> Result<Vec<u8>, SigningError> {
    [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
        .ok_or_else(|| SigningError::MalformedBundle(format!("the {what} is not valid base64")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_bundle_parses_back() {
        for material in [
            Material::Key {
                hint: Some("ab".into()),
            },
            Material::Key { hint: None },
            Material::Certificates(vec![vec![1, 2, 3], vec![4]]),
        ] {
            let json = encode(&material, "type", b"payload", b"sig");
            let parsed = parse(&json).unwrap();
            assert_eq!(parsed.material, material);
            assert_eq!(parsed.payload_type, "type");
            assert_eq!(parsed.payload, b"payload");
            assert_eq!(parsed.signatures, vec![b"sig".to_vec()]);
        }
    }

    #[test]
    fn the_key_bundle_is_laid_out_like_model_signing_writes_it() {
        let json = encode(
            &Material::Key {
                hint: Some("ab".into()),
            },
            "t",
            b"p",
            b"s",
        );
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","verificationMaterial":{"publicKey":{"hint":"ab"},"tlogEntries":[]},"dsseEnvelope":{"payload":"cA==","payloadType":"t","signatures":[{"sig":"cw==","keyid":""}]}}"#
        );
    }

    #[test]
    fn malformed_bundles_are_refused() {
        let ok = String::from_utf8(encode(&Material::Key { hint: None }, "t", b"p", b"s")).unwrap();
        let media = ok.replace("bundle.v0.3+json", "bundle.v0.1+json");
        assert!(matches!(
            parse(media.as_bytes()),
            Err(SigningError::UnsupportedMediaType(m)) if m.ends_with("v0.1+json")
        ));
        // Without a media type there is nothing to say it is a Sigstore bundle.
        assert!(matches!(
            parse(b"{}"),
            Err(SigningError::UnsupportedMediaType(m)) if m.is_empty()
        ));
        let alt = ok.replace(BUNDLE_MEDIA_TYPE, BUNDLE_MEDIA_TYPE_ALT);
        assert!(parse(alt.as_bytes()).is_ok());
        for bad in [
            "{",
            &ok.replace("\"dsseEnvelope\"", "\"messageSignature\""),
            &ok.replace(
                "\"publicKey\":{}",
                "\"publicKey\":{},\"certificate\":{\"rawBytes\":\"\"}",
            ),
            &ok.replace("\"publicKey\":{},", ""),
            &ok.replace("cA==", "!!"),
        ] {
            assert!(
                matches!(parse(bad.as_bytes()), Err(SigningError::MalformedBundle(_))),
                "{bad}"
            );
        }
    }
}
