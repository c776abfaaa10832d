//! `steward model …`, `steward trust …` and `steward audit …`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use steward_proto::admin::v1 as wire;
use steward_proto::admin::v1::{export_audit_response, push_model_request};

use super::{Client, Command, Output, render};

/// Bytes per push message.
const CHUNK: usize = 1 << 20;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Stream a GGUF file to the control plane (hashed as it streams; verified before it is kept).
    Push {
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        /// OpenSSF model-signing bundle for FILE (from `steward model sign` or `model_signing sign`).
        #[arg(long)]
        signature: Option<PathBuf>,
    },
    /// Import a folder on the control-plane host (one .gguf plus its signature), for air-gapped transfer.
    Import {
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
    },
    /// Sign a model file with a private key (PEM), writing an OpenSSF model-signing bundle to
    /// `--output SIG`. Offline.
    Sign {
        file: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// List registered models.
    List,
    /// Show one model by NAME@VERSION or digest.
    Show { model: String },
    /// Revoke an artifact: it can no longer be deployed.
    Revoke {
        digest: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Show trust anchors and unsigned allowances.
    Show,
    /// Trust a public key (PEM) to sign models whose names match PATTERN.
    AddKey {
        key: PathBuf,
        #[arg(long, default_value = "*")]
        models: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Trust a private root CA (PEM) for certificate-based signatures.
    AddRoot {
        certificate: PathBuf,
        #[arg(long, default_value = "*")]
        models: String,
        /// Signer identity (certificate SAN) required; default: any under this root.
        #[arg(long, default_value = "")]
        identity: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Remove a trust anchor by ID.
    Remove { id: String },
    /// Development only: accept unsigned models whose names match PATTERN (audited, visible).
    AllowUnsigned {
        pattern: String,
        #[arg(long)]
        reason: String,
    },
    /// Withdraw an unsigned allowance.
    DisallowUnsigned { pattern: String },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Export events as JSON Lines to `-o FILE`, with a signed manifest in FILE.manifest.json.
    Export {
        /// Start (RFC 3339 or Unix seconds); default: the beginning.
        #[arg(long)]
        since: Option<String>,
        /// End (RFC 3339 or Unix seconds); default: now.
        #[arg(long)]
        until: Option<String>,
    },
    /// Verify an export offline; reports the first broken link.
    Verify {
        file: PathBuf,
        /// Require the manifest to be signed by this CA certificate.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
}

/// Commands that need no control plane. `None`: dial it.
pub fn run_offline(command: &Command, output: Option<&str>) -> anyhow::Result<Option<String>> {
    match command {
        Command::Model(ModelCommand::Sign { file, key }) => {
            let output =
                output.context("`model sign` needs --output SIG (where to write the bundle)")?;
            sign(file, key, Path::new(output)).map(Some)
        }
        Command::Audit(AuditCommand::Verify { file, ca }) => verify(file, ca.as_deref()).map(Some),
        _ => Ok(None),
    }
}

fn sign(file: &Path, key: &Path, output: &Path) -> anyhow::Result<String> {
    use steward_artifact::signing::{SigningKey, sign_model_path};
    let key_pem = std::fs::read_to_string(key)
        .with_context(|| format!("cannot read private key {}", key.display()))?;
    let key = SigningKey::from_pem(&key_pem).context("unusable private key")?;
    // Hashes the file (or directory) exactly as the `model_signing` tool does, so bundles
    // verify with it too.
    let bundle =
        sign_model_path(file, &key).with_context(|| format!("cannot sign {}", file.display()))?;
    std::fs::write(output, bundle).with_context(|| format!("cannot write {}", output.display()))?;
    Ok(format!(
        "signed {} with key {} -> {}",
        file.display(),
        key.fingerprint(),
        output.display()
    ))
}

fn verify(file: &Path, ca: Option<&Path>) -> anyhow::Result<String> {
    let jsonl =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let manifest_path = manifest_path(file);
    let manifest: wire::AuditManifest = serde_json::from_str(
        &std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("cannot read {}", manifest_path.display()))?,
    )
    .with_context(|| format!("{} is not an audit manifest", manifest_path.display()))?;
    let pinned = ca
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display())))
        .transpose()?;
    let verified = crate::audit_export::verify(&jsonl, &manifest, pinned.as_deref())
        .map_err(|e| anyhow::anyhow!("audit export is NOT intact: {e}"))?;
    Ok(format!(
        "audit export intact: {} events, seq {}..={}, head {}{}",
        verified.count,
        verified.first_seq,
        verified.last_seq,
        verified.head_hash,
        if pinned.is_some() {
            ", signed by the pinned CA"
        } else {
            ", signed by the CA in the manifest (pass --ca to pin it)"
        }
    ))
}

fn manifest_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".manifest.json");
    PathBuf::from(name)
}

pub async fn run_model(
    client: &mut Client,
    command: ModelCommand,
    output: Output,
) -> anyhow::Result<String> {
    let model = match command {
        ModelCommand::Push {
            file,
            name,
            version,
            signature,
        } => push(client, &file, name, version, signature.as_deref()).await?,
        ModelCommand::Import { dir, name, version } => {
            let dir = std::path::absolute(&dir).unwrap_or(dir);
            let request = client.request(wire::ImportModelRequest {
                path: dir.to_string_lossy().into_owned(),
                name,
                version,
            });
            client.models.import_model(request).await?.into_inner()
        }
        ModelCommand::List => {
            let request = client.request(wire::ListModelsRequest {});
            let models = client
                .models
                .list_models(request)
                .await?
                .into_inner()
                .models;
            return Ok(match output {
                Output::Json => serde_json::to_string_pretty(&models)?,
                Output::Table => render::models_table(&models),
            });
        }
        ModelCommand::Show { model } => {
            let request = client.request(wire::ModelRef { model });
            client.models.get_model(request).await?.into_inner()
        }
        ModelCommand::Revoke { digest, reason } => {
            let request = client.request(wire::RevokeModelRequest { digest, reason });
            client.models.revoke_model(request).await?.into_inner()
        }
        ModelCommand::Sign { .. } => anyhow::bail!("`model sign` runs offline"),
    };
    Ok(match output {
        Output::Json => serde_json::to_string_pretty(&model)?,
        Output::Table => render::model_detail(&model),
    })
}

async fn push(
    client: &mut Client,
    file: &Path,
    name: String,
    version: String,
    signature: Option<&Path>,
) -> anyhow::Result<wire::Model> {
    let source =
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let size_bytes = source.metadata()?.len();
    let signature_bundle = match signature {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("cannot read signature {}", path.display()))?,
        None => Vec::new(),
    };
    let file_name = file
        .file_name()
        .and_then(|n| n.to_str())
        .context("the model path has no file name")?
        .to_owned();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(wire::PushModelRequest {
        body: Some(push_model_request::Body::Header(wire::PushHeader {
            name,
            version,
            file_name,
            size_bytes,
            signature_bundle,
        })),
    })
    .await?;
    let reader = tokio::task::spawn_blocking(move || read_chunks(source, &tx));
    let request = client.request(tokio_stream::wrappers::ReceiverStream::new(rx));
    let result = client.models.push_model(request).await;
    reader
        .await
        .context("file reader")?
        .with_context(|| format!("reading {}", file.display()))?;
    Ok(result?.into_inner())
}

/// Reads `source` into push messages on a blocking thread, straight into recycled chunks.
fn read_chunks(
    source: std::fs::File,
    tx: &tokio::sync::mpsc::Sender<wire::PushModelRequest>,
) -> std::io::Result<()> {
    let mut chunks = crate::file_chunks::FileChunks::new(source, CHUNK);
    while let Some(chunk) = chunks.next_chunk()? {
        let message = wire::PushModelRequest {
            body: Some(push_model_request::Body::Chunk(chunk)),
        };
        if tx.blocking_send(message).is_err() {
            break;
        }
    }
    Ok(())
}

pub async fn run_trust(
    client: &mut Client,
    command: TrustCommand,
    output: Output,
) -> anyhow::Result<String> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
    };
    let policy = match command {
        TrustCommand::Show => {
            let request = client.request(wire::GetTrustPolicyRequest {});
            client.trust.get_trust_policy(request).await?.into_inner()
        }
        TrustCommand::AddKey {
            key,
            models,
            description,
        } => {
            let request = client.request(wire::AddTrustAnchorRequest {
                kind: wire::TrustAnchorKind::PublicKey as i32,
                pem: read(&key)?,
                identity: String::new(),
                name_pattern: models,
                description,
            });
            let anchor = client.trust.add_trust_anchor(request).await?.into_inner();
            return Ok(match output {
                Output::Json => serde_json::to_string_pretty(&anchor)?,
                Output::Table => format!(
                    "trusted key {} (anchor {}) for models `{}`",
                    anchor.fingerprint, anchor.id, anchor.name_pattern
                ),
            });
        }
        TrustCommand::AddRoot {
            certificate,
            models,
            identity,
            description,
        } => {
            let request = client.request(wire::AddTrustAnchorRequest {
                kind: wire::TrustAnchorKind::CertificateRoot as i32,
                pem: read(&certificate)?,
                identity,
                name_pattern: models,
                description,
            });
            let anchor = client.trust.add_trust_anchor(request).await?.into_inner();
            return Ok(match output {
                Output::Json => serde_json::to_string_pretty(&anchor)?,
                Output::Table => format!(
                    "trusted root {} (anchor {}) for models `{}`",
                    anchor.fingerprint, anchor.id, anchor.name_pattern
                ),
            });
        }
        TrustCommand::Remove { id } => {
            let request = client.request(wire::RemoveTrustAnchorRequest { id });
            client
                .trust
                .remove_trust_anchor(request)
                .await?
                .into_inner()
        }
        TrustCommand::AllowUnsigned { pattern, reason } => {
            let request = client.request(wire::AllowUnsignedRequest {
                name_pattern: pattern,
                reason,
            });
            client.trust.allow_unsigned(request).await?.into_inner()
        }
        TrustCommand::DisallowUnsigned { pattern } => {
            let request = client.request(wire::DisallowUnsignedRequest {
                name_pattern: pattern,
            });
            client.trust.disallow_unsigned(request).await?.into_inner()
        }
    };
    Ok(match output {
        Output::Json => serde_json::to_string_pretty(&policy)?,
        Output::Table => render::trust_policy(&policy),
    })
}

pub async fn run_audit(
    client: &mut Client,
    command: AuditCommand,
    output: Option<&str>,
) -> anyhow::Result<String> {
    let AuditCommand::Export { since, until } = command else {
        anyhow::bail!("`audit verify` runs offline");
    };
    let file =
        PathBuf::from(output.context("`audit export` needs -o FILE (where to write the events)")?);
    let since = since.as_deref().map(parse_time).transpose()?.unwrap_or(0);
    let until = until.as_deref().map(parse_time).transpose()?.unwrap_or(0);
    let request = client.request(wire::ExportAuditRequest {
        since_unix: since,
        until_unix: until,
    });
    let mut stream = client.audit.export_audit(request).await?.into_inner();
    let mut lines = String::new();
    let mut manifest = None;
    while let Some(message) = stream.message().await? {
        match message.body {
            Some(export_audit_response::Body::Event(event)) => {
                lines.push_str(&serde_json::to_string(&event)?);
                lines.push('\n');
            }
            Some(export_audit_response::Body::Manifest(m)) => manifest = Some(m),
            None => {}
        }
    }
    let manifest =
        manifest.context("the control plane sent no manifest; the export is incomplete")?;
    std::fs::write(&file, &lines).with_context(|| format!("cannot write {}", file.display()))?;
    let manifest_file = manifest_path(&file);
    std::fs::write(&manifest_file, serde_json::to_string_pretty(&manifest)?)
        .with_context(|| format!("cannot write {}", manifest_file.display()))?;
    Ok(format!(
        "exported {} events (seq {}..={}) to {} with signed manifest {}",
        manifest.count,
        manifest.first_seq,
        manifest.last_seq,
        file.display(),
        manifest_file.display()
    ))
}

/// Unix seconds or RFC 3339.
fn parse_time(text: &str) -> anyhow::Result<i64> {
    if let Ok(secs) = text.parse::<i64>() {
        return Ok(secs);
    }
    let t = humantime::parse_rfc3339_weak(text)
        .with_context(|| format!("`{text}` is neither Unix seconds nor an RFC 3339 time"))?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0))
}
