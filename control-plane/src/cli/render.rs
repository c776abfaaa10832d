//! Human-readable tables for the CLI. JSON output uses the wire types directly.

use comfy_table::presets::NOTHING;
use comfy_table::{Cell, Table};
use steward_proto::admin::v1::{
    CreateEnrollmentTokenResponse, EnrollmentToken, EnrollmentTokenState, Node, NodeState,
};
use steward_proto::agent::v1::{GpuVendor, Inventory, ModelState, ModelStatus};

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(header.iter().map(Cell::new));
    t
}

/// A node as JSON for scripts: the wire message with enum numbers replaced by names.
pub fn node_json(node: &Node) -> serde_json::Value {
    let mut value = serde_json::to_value(node).unwrap_or_default();
    value["state"] = node_state(node).to_ascii_lowercase().into();
    if let Some(models) = value.get_mut("models").and_then(|m| m.as_array_mut()) {
        for (json, status) in models.iter_mut().zip(&node.models) {
            json["state"] = model_state(status).into();
        }
    }
    if let Some(gpus) = value
        .get_mut("inventory")
        .and_then(|i| i.get_mut("gpus"))
        .and_then(|g| g.as_array_mut())
    {
        for gpu in gpus {
            let vendor = match gpu["vendor"].as_i64() {
                Some(v) if v == GpuVendor::Nvidia as i64 => "nvidia",
                Some(v) if v == GpuVendor::Amd as i64 => "amd",
                _ => "unknown",
            };
            gpu["vendor"] = vendor.into();
        }
    }
    value
}

/// A token as JSON for scripts, with its state by name.
pub fn token_json(token: &EnrollmentToken) -> serde_json::Value {
    let mut value = serde_json::to_value(token).unwrap_or_default();
    value["state"] = token_state(token).into();
    value
}

fn token_state(token: &EnrollmentToken) -> &'static str {
    match EnrollmentTokenState::try_from(token.state).unwrap_or(EnrollmentTokenState::Unspecified) {
        EnrollmentTokenState::Active => "active",
        EnrollmentTokenState::Used => "used",
        EnrollmentTokenState::Expired => "expired",
        EnrollmentTokenState::Revoked => "revoked",
        EnrollmentTokenState::Unspecified => "unknown",
    }
}

pub fn node_state(node: &Node) -> &'static str {
    match NodeState::try_from(node.state).unwrap_or(NodeState::Unspecified) {
        NodeState::Ready => "Ready",
        NodeState::Unavailable => "Unavailable",
        NodeState::Unspecified => "Unknown",
    }
}

fn scheduling(node: &Node) -> &'static str {
    if node.draining {
        "draining"
    } else if node.cordoned {
        "cordoned"
    } else {
        "schedulable"
    }
}

pub use steward_artifact::units::bytes;

fn ago(now: i64, then: i64) -> String {
    if then <= 0 {
        return "-".into();
    }
    let secs = (now - then).max(0) as u64;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

fn gpus_summary(inv: &Inventory) -> String {
    if inv.gpus.is_empty() {
        return "none".into();
    }
    let vram: u64 = inv.gpus.iter().map(|g| g.memory_total_bytes).sum();
    format!("{}x {} ({})", inv.gpus.len(), inv.gpus[0].name, bytes(vram))
}

pub fn nodes_table(nodes: &[Node], now: i64) -> String {
    if nodes.is_empty() {
        return "No nodes enrolled. Create a token with `steward token create` and start \
                `steward-node-agent --token …`."
            .into();
    }
    let mut t = table(&[
        "NAME",
        "ID",
        "STATE",
        "SCHEDULING",
        "ACCEL",
        "GPUS",
        "CPU",
        "MEMORY",
        "LAST SEEN",
    ]);
    for node in nodes {
        let inv = node.inventory.clone().unwrap_or_default();
        let cpu = inv.cpu.clone().unwrap_or_default();
        t.add_row(vec![
            node.name.clone(),
            node.id.chars().take(8).collect(),
            node_state(node).into(),
            scheduling(node).into(),
            if inv.accelerator.is_empty() {
                "-".into()
            } else {
                inv.accelerator.clone()
            },
            gpus_summary(&inv),
            format!("{} cores", cpu.logical_cores),
            bytes(inv.memory_total_bytes),
            if node.connected {
                ago(now, node.last_heartbeat_unix)
            } else {
                format!("offline since {}", ago(now, node.state_changed_at_unix))
            },
        ]);
    }
    t.to_string()
}

/// "2 artifacts, 1.50 GiB; 1 pull under way (300 MiB so far)".
fn artifact_cache(artifacts: &[steward_proto::agent::v1::CachedArtifact]) -> String {
    let (complete, partial): (Vec<_>, Vec<_>) = artifacts.iter().partition(|a| a.complete);
    let sum = |list: &[&steward_proto::agent::v1::CachedArtifact]| {
        bytes(list.iter().map(|a| a.bytes).sum())
    };
    let mut text = match complete.len() {
        0 => "empty".to_owned(),
        1 => format!("1 artifact, {}", sum(&complete)),
        n => format!("{n} artifacts, {}", sum(&complete)),
    };
    match partial.len() {
        0 => {}
        1 => text.push_str(&format!("; 1 pull under way ({} so far)", sum(&partial))),
        n => text.push_str(&format!("; {n} pulls under way ({} so far)", sum(&partial))),
    }
    text
}

pub fn node_detail(node: &Node, now: i64) -> String {
    let inv = node.inventory.clone().unwrap_or_default();
    let cpu = inv.cpu.clone().unwrap_or_default();
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<22}{v}\n"));
    line("Name:", node.name.clone());
    line("ID:", node.id.clone());
    line("State:", node_state(node).into());
    line("Scheduling:", scheduling(node).into());
    if !node.labels.is_empty() {
        let mut labels: Vec<String> = node
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        labels.sort();
        line("Labels:", labels.join(","));
    }
    line(
        "Session:",
        if node.connected {
            format!(
                "connected, last heartbeat {}",
                ago(now, node.last_heartbeat_unix)
            )
        } else {
            "not connected".into()
        },
    );
    line("State changed:", ago(now, node.state_changed_at_unix));
    line("Agent version:", node.agent_version.clone());
    line(
        "Desired generation:",
        format!(
            "{} (applied {})",
            node.desired_generation, node.applied_generation
        ),
    );
    line(
        "Certificate expires:",
        if node.certificate_not_after_unix > now {
            format!(
                "in {}",
                humantime::format_duration(std::time::Duration::from_secs(
                    (node.certificate_not_after_unix - now) as u64
                ))
            )
        } else {
            "expired".into()
        },
    );
    line("Hostname:", inv.hostname.clone());
    line("OS / arch:", format!("{} / {}", inv.os, inv.arch));
    line(
        "CPU:",
        format!(
            "{} ({} logical, {} physical cores)",
            cpu.model, cpu.logical_cores, cpu.physical_cores
        ),
    );
    line(
        "Memory:",
        format!(
            "{} total, {} available",
            bytes(inv.memory_total_bytes),
            bytes(inv.memory_available_bytes)
        ),
    );
    if inv.model_memory_limit_bytes > 0 {
        line(
            "Memory for models:",
            format!(
                "at most {} (the agent's --memory-limit-gib)",
                bytes(inv.model_memory_limit_bytes)
            ),
        );
    }
    line(
        "Disk (data dir):",
        format!(
            "{} free of {}",
            bytes(inv.disk_free_bytes),
            bytes(inv.disk_total_bytes)
        ),
    );
    if inv.artifacts_listed {
        line("Artifact cache:", artifact_cache(&inv.artifacts));
    }
    line(
        "Accelerator:",
        if inv.accelerator == "cpu" {
            "cpu (no GPU detected)".into()
        } else {
            inv.accelerator.clone()
        },
    );
    for note in &inv.probe_notes {
        line("Probe note:", note.clone());
    }
    if !inv.gpus.is_empty() {
        let mut t = table(&[
            "#", "VENDOR", "NAME", "UUID", "MEMORY", "USED", "UTIL", "TEMP", "POWER", "DRIVER",
        ]);
        for gpu in &inv.gpus {
            t.add_row(vec![
                gpu.index.to_string(),
                match GpuVendor::try_from(gpu.vendor).unwrap_or(GpuVendor::Unspecified) {
                    GpuVendor::Nvidia => "nvidia".to_owned(),
                    GpuVendor::Amd => "amd".to_owned(),
                    GpuVendor::Unspecified => "?".to_owned(),
                },
                gpu.name.clone(),
                gpu.uuid.clone(),
                bytes(gpu.memory_total_bytes),
                bytes(gpu.memory_used_bytes),
                gpu.utilization_percent
                    .map(|u| format!("{u}%"))
                    .unwrap_or_else(|| "-".into()),
                gpu.temperature_celsius
                    .map(|c| format!("{c}°C"))
                    .unwrap_or_else(|| "-".into()),
                gpu.power_milliwatts
                    .map(|p| format!("{:.0} W", f64::from(p) / 1000.0))
                    .unwrap_or_else(|| "-".into()),
                if gpu.cuda_version.is_empty() {
                    gpu.driver_version.clone()
                } else {
                    format!("{} (CUDA {})", gpu.driver_version, gpu.cuda_version)
                },
            ]);
        }
        out.push_str("\nGPUs:\n");
        out.push_str(&t.to_string());
        out.push('\n');
    }
    if !node.models.is_empty() {
        out.push_str("\nModels:\n");
        out.push_str(&node_models_table(&node.models));
        out.push('\n');
    }
    out
}

pub fn model_state(status: &ModelStatus) -> &'static str {
    match ModelState::try_from(status.state).unwrap_or(ModelState::Unspecified) {
        ModelState::Pulling => "pulling",
        ModelState::Verifying => "verifying",
        ModelState::Loading => "loading",
        ModelState::Ready => "ready",
        ModelState::Failed => "failed",
        ModelState::Unspecified => "unknown",
    }
}

/// The state with pull progress or the failure reason: `pulling 45% (114 MB of 253 MB)`.
pub fn model_state_text(m: &ModelStatus) -> String {
    let state = model_state(m);
    if m.state == ModelState::Pulling as i32 && m.bytes_total > 0 {
        return format!(
            "{state} {}% ({} of {})",
            m.bytes_done * 100 / m.bytes_total,
            bytes(m.bytes_done),
            bytes(m.bytes_total)
        );
    }
    if m.detail.is_empty() {
        state.to_owned()
    } else {
        format!("{state}: {}", m.detail)
    }
}

/// Serving state and throughput per model, as the agent last reported it.
pub fn node_models_table(models: &[ModelStatus]) -> String {
    let mut t = table(&[
        "MODEL",
        "STATE",
        "SLOTS",
        "QUEUE",
        "GEN TOK/S",
        "PROMPT TOK/S",
        "TTFT P50/P95",
        "TPOT P50/P95",
        "REQUESTS",
        "TOKENS IN/OUT",
    ]);
    let ms = |s: f64| format!("{:.0} ms", s * 1000.0);
    for m in models {
        let st = m.stats.unwrap_or_default();
        let state = model_state_text(m);
        t.add_row(vec![
            m.name.clone(),
            state,
            format!("{}/{} busy", st.busy_slots, st.slots),
            st.queue_depth.to_string(),
            format!("{:.1}", st.generation_tokens_per_second),
            format!("{:.1}", st.prompt_tokens_per_second),
            format!("{} / {}", ms(st.ttft_p50_seconds), ms(st.ttft_p95_seconds)),
            format!("{} / {}", ms(st.tpot_p50_seconds), ms(st.tpot_p95_seconds)),
            format!(
                "{} ok, {} cancelled, {} refused, {} failed",
                st.requests_completed,
                st.requests_cancelled,
                st.requests_rejected,
                st.requests_failed
            ),
            format!("{} / {}", st.prompt_tokens, st.generated_tokens),
        ]);
    }
    t.to_string()
}

pub fn created_token(created: &CreateEnrollmentTokenResponse) -> String {
    let expires = created
        .info
        .as_ref()
        .map(|i| i.expires_at_unix)
        .unwrap_or_default();
    format!(
        "{}\n\nSingle-use enrollment token (shown once), expires at unix time {expires}.\n\
         Enroll a node with: steward-node-agent --control-plane <ENDPOINT> --token <TOKEN>\n",
        created.token
    )
}

pub fn tokens_table(tokens: &[EnrollmentToken]) -> String {
    if tokens.is_empty() {
        return "No enrollment tokens.".into();
    }
    let mut t = table(&[
        "ID",
        "STATE",
        "CREATED BY",
        "EXPIRES (UNIX)",
        "USED BY",
        "DESCRIPTION",
    ]);
    for token in tokens {
        let state = token_state(token);
        t.add_row(vec![
            token.id.clone(),
            state.into(),
            token.created_by.clone(),
            token.expires_at_unix.to_string(),
            if token.used_by_node_id.is_empty() {
                "-".into()
            } else {
                token.used_by_node_id.clone()
            },
            token.description.clone(),
        ]);
    }
    t.to_string()
}

fn short_digest(digest: &str) -> String {
    digest.chars().take(12).collect()
}

fn count(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.2}B", n as f64 / 1e9),
    }
}

pub fn models_table(models: &[steward_proto::admin::v1::Model]) -> String {
    if models.is_empty() {
        return "No models. Push one with `steward model push FILE --name N --version V --signature SIG`.".into();
    }
    let mut t = table(&[
        "NAME", "VERSION", "DIGEST", "SIZE", "ARCH", "PARAMS", "QUANT", "SIGNER", "STATUS",
    ]);
    for m in models {
        let g = m.gguf.clone().unwrap_or_default();
        t.add_row(vec![
            m.name.clone(),
            m.version.clone(),
            short_digest(&m.digest),
            bytes(m.size_bytes),
            g.architecture,
            count(g.parameter_count),
            g.quantization,
            if m.signer.is_empty() {
                "unsigned".into()
            } else {
                m.signer.chars().take(23).collect()
            },
            if m.revoked {
                "REVOKED".into()
            } else {
                m.verification.clone()
            },
        ]);
    }
    t.to_string()
}

pub fn model_detail(m: &steward_proto::admin::v1::Model) -> String {
    let g = m.gguf.clone().unwrap_or_default();
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<22}{v}\n"));
    line("Model:", format!("{}@{}", m.name, m.version));
    line("Digest:", format!("sha256:{}", m.digest));
    line(
        "Size:",
        format!("{} ({} bytes)", bytes(m.size_bytes), m.size_bytes),
    );
    line("File:", m.file_name.clone());
    line(
        "Signer:",
        if m.signer.is_empty() {
            "(unsigned)".into()
        } else {
            m.signer.clone()
        },
    );
    line("Verification:", m.verification.clone());
    if m.revoked {
        line(
            "Revoked:",
            format!("yes, at unix {}: {}", m.revoked_at_unix, m.revoked_reason),
        );
    }
    line("Architecture:", g.architecture);
    if !g.model_name.is_empty() {
        line("GGUF name:", g.model_name);
    }
    line(
        "Parameters:",
        format!("{} ({})", count(g.parameter_count), g.parameter_count),
    );
    line("Quantization:", g.quantization);
    line("Context length:", g.context_length.to_string());
    line("Layers:", g.layer_count.to_string());
    line("Load estimate:", bytes(g.estimated_load_bytes));
    line(
        "GGUF:",
        format!(
            "v{}, {} tensors, chat template: {}",
            g.gguf_version,
            g.tensor_count,
            if g.has_chat_template { "yes" } else { "no" }
        ),
    );
    line(
        "Pushed by:",
        format!("{} at unix {}", m.created_by, m.created_at_unix),
    );
    out
}

pub fn trust_policy(p: &steward_proto::admin::v1::TrustPolicy) -> String {
    use steward_proto::admin::v1::TrustAnchorKind;
    let mut out = String::new();
    if p.anchors.is_empty() {
        out.push_str("No trust anchors: every signed model is refused. Add one with `steward trust add-key KEY.pub`.\n");
    } else {
        let mut t = table(&[
            "ID",
            "KIND",
            "FINGERPRINT",
            "MODELS",
            "IDENTITY",
            "DESCRIPTION",
        ]);
        for a in &p.anchors {
            t.add_row(vec![
                a.id.clone(),
                match TrustAnchorKind::try_from(a.kind) {
                    Ok(TrustAnchorKind::CertificateRoot) => "certificate root".into(),
                    _ => "public key".to_owned(),
                },
                a.fingerprint.chars().take(23).collect(),
                a.name_pattern.clone(),
                if a.identity.is_empty() {
                    "-".into()
                } else {
                    a.identity.clone()
                },
                a.description.clone(),
            ]);
        }
        out.push_str(&t.to_string());
        out.push('\n');
    }
    if p.unsigned_allowed.is_empty() {
        out.push_str("Unsigned models: refused.\n");
    } else {
        out.push_str("\nUNSIGNED MODELS ALLOWED (development):\n");
        for a in &p.unsigned_allowed {
            out.push_str(&format!(
                "  {}  by {}: {}\n",
                a.name_pattern, a.created_by, a.reason
            ));
        }
    }
    out
}

/// Deployments, one per line.
pub fn deployments_table(deployments: &[steward_proto::admin::v1::Deployment]) -> String {
    let mut t = table(&[
        "NAME", "MODEL", "DIGEST", "SELECTOR", "REPLICAS", "READY", "SLOTS", "CTX", "ROLLOUT",
    ]);
    for d in deployments {
        let ready = d
            .placed
            .iter()
            .filter(|r| {
                r.status
                    .as_ref()
                    .is_some_and(|s| s.state == ModelState::Ready as i32 && s.digest == d.digest)
            })
            .count();
        t.add_row(vec![
            d.name.clone(),
            format!("{}@{}", d.model_name, d.model_version),
            short_digest(&d.digest),
            d.selector.clone(),
            format!(
                "{}/{}{}",
                d.placed.len(),
                d.replicas,
                if d.missing_replicas > 0 {
                    " (unschedulable)"
                } else {
                    ""
                }
            ),
            ready.to_string(),
            d.slots.to_string(),
            d.context_per_slot.to_string(),
            d.rollout.as_ref().map_or("-".into(), rollout_summary),
        ]);
    }
    t.to_string()
}

fn rollout_phase(r: &steward_proto::admin::v1::Rollout) -> &'static str {
    use steward_proto::admin::v1::RolloutPhase;
    match r.phase() {
        RolloutPhase::Progressing => "progressing",
        RolloutPhase::Complete => "complete",
        RolloutPhase::RolledBack => "rolled back",
        RolloutPhase::RollingBack => "rolling back",
        RolloutPhase::Unspecified => "unknown",
    }
}

/// `progressing 1/3`, `complete`, `rolled back`.
fn rollout_summary(r: &steward_proto::admin::v1::Rollout) -> String {
    let phase = rollout_phase(r);
    if matches!(
        r.phase(),
        steward_proto::admin::v1::RolloutPhase::Progressing
            | steward_proto::admin::v1::RolloutPhase::RollingBack
    ) {
        let verified = r.steps.iter().filter(|s| s.verified_at_unix > 0).count();
        format!("{phase} ({verified} verified)")
    } else {
        phase.to_owned()
    }
}

/// One deployment: its spec, where each replica runs and in which state, and why any
/// replica could not be placed.
pub fn deployment_detail(d: &steward_proto::admin::v1::Deployment) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<16}{v}\n"));
    line("Name:", d.name.clone());
    line("Model:", format!("{}@{}", d.model_name, d.model_version));
    line("Digest:", d.digest.clone());
    line("Selector:", d.selector.clone());
    line(
        "Replicas:",
        format!("{} wanted, {} placed", d.replicas, d.placed.len()),
    );
    line(
        "Per replica:",
        format!(
            "{} slots × {} tokens, GPU layers {}",
            d.slots,
            d.context_per_slot,
            if d.gpu_layers < 0 {
                "auto".to_owned()
            } else {
                d.gpu_layers.to_string()
            }
        ),
    );
    line("Created by:", d.created_by.clone());
    line("Max unavail.:", d.max_unavailable.to_string());
    if let Some(r) = &d.rollout {
        let change = if r.from_settings == r.to_settings {
            format!("{} → {}", r.from_model, r.to_model)
        } else if r.from_model == r.to_model {
            format!("{}: {} → {}", r.to_model, r.from_settings, r.to_settings)
        } else {
            format!(
                "{} ({}) → {} ({})",
                r.from_model, r.from_settings, r.to_model, r.to_settings
            )
        };
        line("Rollout:", format!("{change}: {}", rollout_summary(r)));
        if !r.message.is_empty() {
            line("", r.message.clone());
        }
        for step in &r.steps {
            let state = if step.verified_at_unix > 0 {
                "ready, probe answered"
            } else {
                "switching"
            };
            line("", format!("{}: {state}", step.node_name));
        }
    }
    if !d.placed.is_empty() {
        let mut t = table(&["NODE", "DIGEST", "STATE", "GEN TOK/S", "REQUESTS"]);
        for r in &d.placed {
            let (state, tps, requests) = match &r.status {
                Some(s) => {
                    let st = s.stats.unwrap_or_default();
                    // During a rollout of new settings a replica not yet switched runs the
                    // old ones under the same digest.
                    let previous = s.assigned_slots != 0
                        && (
                            s.assigned_slots,
                            s.assigned_context_per_slot,
                            s.assigned_gpu_layers,
                        ) != (d.slots, d.context_per_slot, d.gpu_layers);
                    (
                        format!(
                            "{}{}",
                            model_state_text(s),
                            if previous { " (previous settings)" } else { "" }
                        ),
                        format!("{:.1}", st.generation_tokens_per_second),
                        st.requests_completed.to_string(),
                    )
                }
                None => ("waiting for the agent".into(), "-".into(), "-".into()),
            };
            t.add_row(vec![
                r.node_name.clone(),
                short_digest(&r.digest),
                state,
                tps,
                requests,
            ]);
        }
        out.push_str("\nReplicas:\n");
        out.push_str(&t.to_string());
        out.push('\n');
    }
    if d.missing_replicas > 0 {
        out.push_str(&format!(
            "\nUnschedulable: {} replica(s)\n",
            d.missing_replicas
        ));
        if d.unschedulable_reasons.is_empty() {
            out.push_str("  no node matches the selector\n");
        }
        for reason in &d.unschedulable_reasons {
            out.push_str(&format!("  {reason}\n"));
        }
    }
    out
}

/// A deployment as JSON for scripts, with model states by name.
pub fn deployment_json(d: &steward_proto::admin::v1::Deployment) -> serde_json::Value {
    let mut value = serde_json::to_value(d).unwrap_or_default();
    if let Some(placed) = value.get_mut("placed").and_then(|p| p.as_array_mut()) {
        for (json, replica) in placed.iter_mut().zip(&d.placed) {
            if let Some(status) = &replica.status {
                json["status"]["state"] = model_state(status).into();
            }
        }
    }
    if let Some(r) = &d.rollout {
        value["rollout"]["phase"] = rollout_phase(r).replace(' ', "_").into();
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use steward_proto::agent::v1::{Cpu, Gpu};

    fn node(connected: bool) -> Node {
        Node {
            id: "0123456789abcdef".into(),
            name: "radiology-1".into(),
            state: NodeState::Ready as i32,
            connected,
            last_heartbeat_unix: 995,
            inventory: Some(Inventory {
                accelerator: "cuda".into(),
                memory_total_bytes: 64 << 30,
                cpu: Some(Cpu {
                    logical_cores: 32,
                    ..Default::default()
                }),
                gpus: vec![Gpu {
                    vendor: GpuVendor::Nvidia as i32,
                    name: "NVIDIA H100".into(),
                    memory_total_bytes: 80 << 30,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn node_table_shows_state_hardware_and_age() {
        let out = nodes_table(&[node(true)], 1000);
        for expected in [
            "radiology-1",
            "01234567",
            "Ready",
            "schedulable",
            "1x NVIDIA H100 (80.0 GiB)",
            "32 cores",
            "64.0 GiB",
            "5s ago",
        ] {
            assert!(out.contains(expected), "missing {expected:?} in\n{out}");
        }
    }

    #[test]
    fn cpu_only_nodes_say_so() {
        let mut n = node(false);
        n.inventory.as_mut().unwrap().gpus.clear();
        n.inventory.as_mut().unwrap().accelerator = "cpu".into();
        let out = node_detail(&n, 1000);
        assert!(out.contains("cpu (no GPU detected)"), "{out}");
    }

    #[test]
    fn a_node_shows_its_artifact_cache_once_its_agent_lists_it() {
        use steward_proto::agent::v1::CachedArtifact;
        let mut n = node(true);
        assert!(!node_detail(&n, 1000).contains("Artifact cache"));
        let inventory = n.inventory.as_mut().unwrap();
        inventory.artifacts_listed = true;
        assert!(node_detail(&n, 1000).contains("Artifact cache:       empty"));
        let artifact = |bytes: u64, complete| CachedArtifact {
            digest: "ab".repeat(32),
            bytes,
            complete,
        };
        n.inventory.as_mut().unwrap().artifacts = vec![
            artifact(1 << 30, true),
            artifact(1 << 29, true),
            artifact(300 << 20, false),
        ];
        let out = node_detail(&n, 1000);
        assert!(
            out.contains(
                "Artifact cache:       2 artifacts, 1.50 GiB; 1 pull under way (300 MiB so far)"
            ),
            "{out}"
        );
    }

    #[test]
    fn a_nodes_memory_limit_is_shown_only_when_set() {
        let mut n = node(true);
        assert!(!node_detail(&n, 1000).contains("Memory for models"));
        n.inventory.as_mut().unwrap().model_memory_limit_bytes = 16 << 30;
        let out = node_detail(&n, 1000);
        assert!(
            out.contains("Memory for models:    at most 16.0 GiB (the agent's --memory-limit-gib)"),
            "{out}"
        );
    }

    #[test]
    fn a_rollout_of_new_settings_shows_the_settings_it_changes() {
        use steward_proto::admin::v1::{Deployment, Replica, Rollout, RolloutPhase};
        let status = |slots, ctx| ModelStatus {
            state: ModelState::Ready as i32,
            assigned_slots: slots,
            assigned_context_per_slot: ctx,
            assigned_gpu_layers: -1,
            ..ModelStatus::default()
        };
        let d = Deployment {
            name: "chat".into(),
            slots: 2,
            context_per_slot: 1024,
            gpu_layers: -1,
            placed: vec![
                Replica {
                    node_name: "gpu-1".into(),
                    status: Some(status(2, 1024)),
                    ..Replica::default()
                },
                Replica {
                    node_name: "gpu-2".into(),
                    status: Some(status(1, 512)),
                    ..Replica::default()
                },
            ],
            rollout: Some(Rollout {
                phase: RolloutPhase::Progressing as i32,
                from_model: "gemma@1".into(),
                to_model: "gemma@1".into(),
                from_settings: "slots 1, ctx 512, gpu-layers auto".into(),
                to_settings: "slots 2, ctx 1024, gpu-layers auto".into(),
                ..Rollout::default()
            }),
            ..Deployment::default()
        };
        let out = deployment_detail(&d);
        assert!(
            out.contains(
                "gemma@1: slots 1, ctx 512, gpu-layers auto → slots 2, ctx 1024, gpu-layers auto: progressing"
            ),
            "{out}"
        );
        let row = |node: &str| out.lines().find(|l| l.contains(node)).unwrap().to_owned();
        assert!(!row("gpu-1").contains("previous"), "{out}");
        assert!(row("gpu-2").contains("ready (previous settings)"), "{out}");
    }

    #[test]
    fn a_rolled_back_deployment_shows_why_and_which_nodes_switched() {
        use steward_proto::admin::v1::{Deployment, Rollout, RolloutPhase, RolloutStep};
        let d = Deployment {
            name: "chat".into(),
            model_name: "gemma".into(),
            model_version: "1".into(),
            max_unavailable: 1,
            rollout: Some(Rollout {
                phase: RolloutPhase::RolledBack as i32,
                from_model: "gemma@1".into(),
                to_model: "gemma@2".into(),
                message: "gpu-1: the new model failed: missing tensor".into(),
                steps: vec![RolloutStep {
                    node_name: "gpu-1".into(),
                    ..RolloutStep::default()
                }],
                ..Rollout::default()
            }),
            ..Deployment::default()
        };
        let out = deployment_detail(&d);
        for expected in [
            "gemma@1 → gemma@2: rolled back",
            "gpu-1: the new model failed: missing tensor",
            "gpu-1: switching",
        ] {
            assert!(
                out.contains(expected),
                "missing {expected:?} in
{out}"
            );
        }
        assert!(deployments_table(std::slice::from_ref(&d)).contains("rolled back"));
        assert_eq!(deployment_json(&d)["rollout"]["phase"], "rolled_back");
    }
}
