//! `steward deploy …`: deployments of verified models onto nodes.

use clap::Subcommand;
use steward_proto::admin::v1 as wire;

use super::{Client, Output, render};

#[derive(Debug, Subcommand)]
pub enum DeployCommand {
    /// Deploy a verified model onto the nodes a selector matches.
    Create {
        /// Deployment name; also the model name clients use in the OpenAI API.
        name: String,
        /// `NAME@VERSION` or a sha256 digest from the registry.
        #[arg(long)]
        model: String,
        /// `*` (every node), `key=value,…` over node labels, or a node name.
        #[arg(long, default_value = "*")]
        nodes: String,
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// Concurrent sequences per replica.
        #[arg(long, default_value_t = 4)]
        slots: u32,
        /// Context tokens per slot.
        #[arg(long, default_value_t = 4096)]
        ctx: u32,
        /// `auto` (from free VRAM) or a layer count.
        #[arg(long, default_value = "auto")]
        gpu_layers: String,
        /// Replicas a rollout may take down at once when the model changes.
        #[arg(long, default_value_t = 1)]
        max_unavailable: u32,
    },
    /// Change a deployment; only the given flags change. A new `--model` rolls out node by
    /// node (each step gated on the new model being ready and answering a probe) and rolls
    /// back by itself if a step fails.
    Update {
        name: String,
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        nodes: Option<String>,
        #[arg(long)]
        replicas: Option<u32>,
        #[arg(long)]
        slots: Option<u32>,
        #[arg(long)]
        ctx: Option<u32>,
        #[arg(long)]
        gpu_layers: Option<String>,
        #[arg(long)]
        max_unavailable: Option<u32>,
    },
    /// Return to the model before the last rollout: at once while that rollout is still in
    /// progress, otherwise as a new rollout.
    Rollback { name: String },
    /// Delete a deployment; its replicas are unloaded.
    Delete { name: String },
    /// Every deployment with its placed and ready replicas.
    List,
    /// One deployment: replicas per node with their state, and why any is unschedulable.
    Show { name: String },
}

fn gpu_layers(text: &str) -> anyhow::Result<i32> {
    if text == "auto" {
        return Ok(-1);
    }
    text.parse::<u16>()
        .map(i32::from)
        .map_err(|_| anyhow::anyhow!("--gpu-layers must be `auto` or a layer count, not `{text}`"))
}

pub async fn run(
    client: &mut Client,
    command: DeployCommand,
    output: Output,
) -> anyhow::Result<String> {
    let one = |d: wire::Deployment| -> anyhow::Result<String> {
        Ok(match output {
            Output::Json => serde_json::to_string_pretty(&render::deployment_json(&d))?,
            Output::Table => render::deployment_detail(&d),
        })
    };
    match command {
        DeployCommand::Create {
            name,
            model,
            nodes,
            replicas,
            slots,
            ctx,
            gpu_layers: layers,
            max_unavailable,
        } => {
            let layers = gpu_layers(&layers)?;
            let request = client.request(wire::CreateDeploymentRequest {
                name,
                model,
                selector: nodes,
                replicas,
                slots,
                context_per_slot: ctx,
                gpu_layers: (layers >= 0).then_some(layers),
                max_unavailable,
            });
            one(client
                .deployments
                .create_deployment(request)
                .await?
                .into_inner())
        }
        DeployCommand::Update {
            name,
            model,
            nodes,
            replicas,
            slots,
            ctx,
            gpu_layers: layers,
            max_unavailable,
        } => {
            let request = client.request(wire::UpdateDeploymentRequest {
                name,
                model,
                selector: nodes,
                replicas,
                slots,
                context_per_slot: ctx,
                gpu_layers: layers.as_deref().map(gpu_layers).transpose()?,
                max_unavailable,
            });
            one(client
                .deployments
                .update_deployment(request)
                .await?
                .into_inner())
        }
        DeployCommand::Rollback { name } => {
            let request = client.request(wire::DeploymentRef { name });
            one(client
                .deployments
                .rollback_deployment(request)
                .await?
                .into_inner())
        }
        DeployCommand::Delete { name } => {
            let request = client.request(wire::DeploymentRef { name: name.clone() });
            client.deployments.delete_deployment(request).await?;
            Ok(format!("deleted deployment {name}"))
        }
        DeployCommand::List => {
            let all = client
                .deployments
                .list_deployments(client.request(wire::ListDeploymentsRequest {}))
                .await?
                .into_inner()
                .deployments;
            Ok(match output {
                Output::Json => serde_json::to_string_pretty(
                    &all.iter().map(render::deployment_json).collect::<Vec<_>>(),
                )?,
                Output::Table => render::deployments_table(&all),
            })
        }
        DeployCommand::Show { name } => {
            let request = client.request(wire::DeploymentRef { name });
            one(client
                .deployments
                .get_deployment(request)
                .await?
                .into_inner())
        }
    }
}
