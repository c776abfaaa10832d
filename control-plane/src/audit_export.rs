//! Tamper-evident audit exports: a JSON Lines file of events plus a manifest signed by the
//! control plane's CA key, and the offline check that finds the first broken link.

use std::fmt::Write as _;

use base64::Engine as _;
use steward_db::{AuditRecord, Store};
use steward_proto::admin::v1::{AuditEvent, AuditManifest};

use crate::fleet::now_unix;
use crate::pki::{CertificateAuthority, PkiError};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("storage failed")]
    Db(#[from] steward_db::DbError),
    #[error("signing the manifest failed")]
    Sign(#[from] PkiError),
}

/// The first problem found in an export, naming where.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BrokenExport {
    #[error("line {line} is not a valid audit event: {detail}")]
    Unreadable { line: usize, detail: String },
    #[error(
        "line {line}: expected event seq {expected}, found seq {found} (an event was removed, \
         inserted or reordered)"
    )]
    Sequence {
        line: usize,
        expected: i64,
        found: i64,
    },
    #[error(
        "event seq {seq} (line {line}) does not link to the event before it (prev_hash mismatch)"
    )]
    Link { line: usize, seq: i64 },
    #[error("event seq {seq} (line {line}) was edited: its content does not match its hash")]
    Edited { line: usize, seq: i64 },
    #[error(
        "the export ends at seq {last_seq} with {count} events, but the manifest promises seq \
         {manifest_last} and {manifest_count} events (truncated or extended)"
    )]
    Truncated {
        last_seq: i64,
        count: u64,
        manifest_last: i64,
        manifest_count: u64,
    },
    #[error("the last event's hash is not the manifest's head hash")]
    HeadMismatch,
    #[error("the manifest's signed text does not match its fields")]
    ManifestEdited,
    #[error("the manifest signature does not verify: {0}")]
    BadSignature(String),
    #[error("the manifest is signed by a different control plane than the pinned CA")]
    WrongSigner,
}

/// What a good export proves.
#[derive(Debug, PartialEq, Eq)]
pub struct VerifiedExport {
    pub count: u64,
    pub first_seq: i64,
    pub last_seq: i64,
    pub head_hash: String,
}

pub fn wire_event(record: &AuditRecord) -> AuditEvent {
    AuditEvent {
        seq: record.seq,
        at_unix: record.at,
        actor: record.actor.clone(),
        action: record.action.clone(),
        target: record.target.clone(),
        outcome: record.outcome.clone(),
        details: record.details.clone(),
        prev_hash: record.prev_hash.clone(),
        hash: record.hash.clone(),
    }
}

fn record(event: &AuditEvent) -> AuditRecord {
    AuditRecord {
        seq: event.seq,
        at: event.at_unix,
        actor: event.actor.clone(),
        action: event.action.clone(),
        target: event.target.clone(),
        outcome: event.outcome.clone(),
        details: event.details.clone(),
        prev_hash: event.prev_hash.clone(),
        hash: event.hash.clone(),
    }
}

/// The exact text the control plane signs for a manifest.
pub fn signed_text(m: &AuditManifest) -> String {
    let mut text = String::from("steward-audit-export/v1");
    let _ = write!(
        text,
        " since={} until={} first_seq={} last_seq={} count={} base_hash={} head_hash={} exported_at={}",
        m.since_unix,
        m.until_unix,
        m.first_seq,
        m.last_seq,
        m.count,
        m.base_hash,
        m.head_hash,
        m.exported_at_unix
    );
    text
}

/// Reads the events in range and signs a manifest over them.
pub async fn export(
    store: &Store,
    ca: &CertificateAuthority,
    since: i64,
    until: i64,
) -> Result<(Vec<AuditRecord>, AuditManifest), ExportError> {
    let events = store.audit_events_between(since, until).await?;
    let mut manifest = AuditManifest {
        since_unix: since,
        until_unix: until,
        first_seq: events.first().map_or(0, |e| e.seq),
        last_seq: events.last().map_or(0, |e| e.seq),
        count: events.len() as u64,
        base_hash: events
            .first()
            .map(|e| e.prev_hash.clone())
            .unwrap_or_default(),
        head_hash: events.last().map(|e| e.hash.clone()).unwrap_or_default(),
        signer_certificate_pem: ca.certificate_pem().to_owned(),
        signature: String::new(),
        signed_text: String::new(),
        exported_at_unix: now_unix(),
    };
    manifest.signed_text = signed_text(&manifest);
    manifest.signature =
        base64::engine::general_purpose::STANDARD.encode(ca.sign(manifest.signed_text.as_bytes())?);
    Ok((events, manifest))
}

/// Checks an export offline: the manifest signature (optionally against a pinned CA), then
/// every event's hash and link, the sequence, and that the file ends at the signed head.
pub fn verify(
    jsonl: &str,
    manifest: &AuditManifest,
    pinned_ca_pem: Option<&str>,
) -> Result<VerifiedExport, BrokenExport> {
    verify_manifest(manifest, pinned_ca_pem)?;
    let mut previous_hash = manifest.base_hash.clone();
    let mut count = 0u64;
    let mut last_seq = manifest.first_seq - 1;
    for (index, line) in jsonl
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let line_no = index + 1;
        let event: AuditEvent =
            serde_json::from_str(line).map_err(|e| BrokenExport::Unreadable {
                line: line_no,
                detail: e.to_string(),
            })?;
        let expected_seq = manifest.first_seq + count as i64;
        if event.seq != expected_seq {
            return Err(BrokenExport::Sequence {
                line: line_no,
                expected: expected_seq,
                found: event.seq,
            });
        }
        if !record(&event).hash_is_valid() {
            return Err(BrokenExport::Edited {
                line: line_no,
                seq: event.seq,
            });
        }
        if event.prev_hash != previous_hash {
            return Err(BrokenExport::Link {
                line: line_no,
                seq: event.seq,
            });
        }
        previous_hash = event.hash;
        last_seq = event.seq;
        count += 1;
    }
    if count != manifest.count || (count > 0 && last_seq != manifest.last_seq) {
        return Err(BrokenExport::Truncated {
            last_seq,
            count,
            manifest_last: manifest.last_seq,
            manifest_count: manifest.count,
        });
    }
    if count > 0 && previous_hash != manifest.head_hash {
        return Err(BrokenExport::HeadMismatch);
    }
    Ok(VerifiedExport {
        count,
        first_seq: manifest.first_seq,
        last_seq: manifest.last_seq,
        head_hash: manifest.head_hash.clone(),
    })
}

fn verify_manifest(
    manifest: &AuditManifest,
    pinned_ca_pem: Option<&str>,
) -> Result<(), BrokenExport> {
    if signed_text(manifest) != manifest.signed_text {
        return Err(BrokenExport::ManifestEdited);
    }
    let bad = |m: &str| BrokenExport::BadSignature(m.to_owned());
    let signer = steward_proto::transport::parse_certs(&manifest.signer_certificate_pem, "signer")
        .map_err(|_| bad("the signer certificate is unreadable"))?
        .remove(0);
    if let Some(pinned) = pinned_ca_pem {
        let pinned = steward_proto::transport::parse_certs(pinned, "pinned CA")
            .map_err(|_| bad("the pinned CA certificate is unreadable"))?
            .remove(0);
        if pinned != signer {
            return Err(BrokenExport::WrongSigner);
        }
    }
    let (_, cert) = x509_parser::parse_x509_certificate(&signer)
        .map_err(|_| bad("the signer certificate is unreadable"))?;
    let point = cert.public_key().subject_public_key.data.to_vec();
    let signature = base64::engine::general_purpose::STANDARD
        .decode(&manifest.signature)
        .map_err(|_| bad("the signature is not base64"))?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, point)
        .verify(manifest.signed_text.as_bytes(), &signature)
        .map_err(|_| bad("signature mismatch"))
}
