//! The `steward` admin CLI: argument parsing, the authenticated client, and rendering.

mod deploy;
mod models;
pub mod render;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use steward_proto::admin::v1::admin_service_client::AdminServiceClient;
use steward_proto::admin::v1::audit_service_client::AuditServiceClient;
use steward_proto::admin::v1::deployment_service_client::DeploymentServiceClient;
use steward_proto::admin::v1::model_service_client::ModelServiceClient;
use steward_proto::admin::v1::trust_service_client::TrustServiceClient;
use steward_proto::admin::v1::{
    CreateEnrollmentTokenRequest, LabelNodeRequest, ListEnrollmentTokensRequest, ListNodesRequest,
    NodeRef, RevokeEnrollmentTokenRequest,
};
use steward_proto::transport::{ServerTrust, client_config, connect};
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

pub const DEFAULT_ENDPOINT: &str = "https://127.0.0.1:7443";
pub const DEFAULT_DATA_DIR: &str = "steward-data";

/// Administer a Steward fleet.
///
/// The endpoint, credential and CA come from flags or the environment:
/// STEWARD_ENDPOINT (default https://127.0.0.1:7443), STEWARD_TOKEN (an admin credential,
/// `stwa1.…`, printed once by the control plane's first start) and STEWARD_CA_FILE (the
/// control plane's CA certificate, default steward-data/ca.pem).
#[derive(Debug, Parser)]
#[command(name = "steward", version)]
pub struct Cli {
    #[command(flatten)]
    pub conn: Connection,
    /// `table` (default) or `json` for commands that show things; the output file for
    /// `model sign` and `audit export`.
    #[arg(short = 'o', long, global = true, value_name = "FORMAT|FILE")]
    pub output: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Connection {
    /// Control-plane gRPC endpoint.
    #[arg(long, env = "STEWARD_ENDPOINT", default_value = DEFAULT_ENDPOINT, global = true)]
    pub endpoint: String,
    /// Admin credential (`stwa1.<id>.<secret>`).
    #[arg(long, env = "STEWARD_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// PEM file with the control plane's CA certificate.
    #[arg(long, env = "STEWARD_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

impl Output {
    fn parse(text: Option<&str>) -> anyhow::Result<Self> {
        match text {
            None | Some("table") => Ok(Self::Table),
            Some("json") => Ok(Self::Json),
            Some(other) => {
                anyhow::bail!("-o/--output must be `table` or `json` here, not `{other}`")
            }
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enrolled nodes.
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// Enrollment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The model registry: push, import, sign, list, show, revoke.
    #[command(subcommand)]
    Model(models::ModelCommand),
    /// The trust policy: which keys may sign which models.
    #[command(subcommand)]
    Trust(models::TrustCommand),
    /// The tamper-evident audit log: export and verify.
    #[command(subcommand)]
    Audit(models::AuditCommand),
    /// Deployments: which verified model runs on which nodes.
    #[command(subcommand)]
    Deploy(deploy::DeployCommand),
}

#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    /// List every node with its state and hardware.
    List,
    /// Show one node (by ID or name) in detail.
    Show { node: String },
    /// Stop placing new work on a node.
    Cordon { node: String },
    /// Allow placements again (also ends a drain).
    Uncordon { node: String },
    /// Cordon a node and tell its agent to drain.
    Drain { node: String },
    /// Set labels (`key=value`) and remove them (`key-`); selectors match labels.
    Label {
        node: String,
        #[arg(required = true)]
        labels: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a single-use enrollment token.
    Create {
        /// Lifetime, e.g. `30m`, `4h` (default and maximum: 24h).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Free text to remember what the token is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List enrollment tokens (never their secrets).
    List,
    /// Revoke an unused token by ID.
    Revoke { id: String },
}

/// Runs one CLI invocation, printing to stdout.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // Commands that work offline never dial the control plane.
    if let Some(out) = models::run_offline(&cli.command, cli.output.as_deref())? {
        println!("{}", out.trim_end());
        return Ok(());
    }
    if let Command::Audit(cmd) = cli.command {
        let mut client = Client::connect(&cli.conn).await?;
        let out = models::run_audit(&mut client, cmd, cli.output.as_deref()).await?;
        println!("{}", out.trim_end());
        return Ok(());
    }
    let output = Output::parse(cli.output.as_deref())?;
    let mut client = Client::connect(&cli.conn).await?;
    let out = match cli.command {
        Command::Model(cmd) => models::run_model(&mut client, cmd, output).await?,
        Command::Trust(cmd) => models::run_trust(&mut client, cmd, output).await?,
        Command::Audit(_) => unreachable!("handled above"),
        Command::Deploy(cmd) => deploy::run(&mut client, cmd, output).await?,
        Command::Nodes(cmd) => {
            let node_ref = |node: String| NodeRef { node };
            match cmd {
                NodesCommand::List => {
                    let nodes = client
                        .admin
                        .list_nodes(client.request(ListNodesRequest {}))
                        .await?
                        .into_inner()
                        .nodes;
                    match output {
                        Output::Json => serde_json::to_string_pretty(
                            &nodes.iter().map(render::node_json).collect::<Vec<_>>(),
                        )?,
                        Output::Table => render::nodes_table(&nodes, now_unix()),
                    }
                }
                NodesCommand::Show { node } => {
                    let node = client
                        .admin
                        .get_node(client.request(node_ref(node)))
                        .await?;
                    render_node(output, &node.into_inner())?
                }
                NodesCommand::Cordon { node } => {
                    let node = client
                        .admin
                        .cordon_node(client.request(node_ref(node)))
                        .await?;
                    render_node(output, &node.into_inner())?
                }
                NodesCommand::Uncordon { node } => {
                    let node = client
                        .admin
                        .uncordon_node(client.request(node_ref(node)))
                        .await?;
                    render_node(output, &node.into_inner())?
                }
                NodesCommand::Label { node, labels } => {
                    let mut request = LabelNodeRequest {
                        node,
                        ..Default::default()
                    };
                    for label in labels {
                        if let Some((key, value)) = label.split_once('=') {
                            request.set.insert(key.to_owned(), value.to_owned());
                        } else if let Some(key) = label.strip_suffix('-') {
                            request.remove.push(key.to_owned());
                        } else {
                            anyhow::bail!("label `{label}` is neither `key=value` nor `key-`");
                        }
                    }
                    let node = client.admin.label_node(client.request(request)).await?;
                    render_node(output, &node.into_inner())?
                }
                NodesCommand::Drain { node } => {
                    let node = client
                        .admin
                        .drain_node(client.request(node_ref(node)))
                        .await?;
                    render_node(output, &node.into_inner())?
                }
            }
        }
        Command::Token(cmd) => match cmd {
            TokenCommand::Create { ttl, description } => {
                let created = client
                    .admin
                    .create_enrollment_token(client.request(CreateEnrollmentTokenRequest {
                        ttl_seconds: ttl.map(|d| d.as_secs().max(1)).unwrap_or(0),
                        description,
                    }))
                    .await?
                    .into_inner();
                match output {
                    Output::Json => {
                        let mut value = serde_json::to_value(&created)?;
                        if let Some(info) = &created.info {
                            value["info"] = render::token_json(info);
                        }
                        serde_json::to_string_pretty(&value)?
                    }
                    Output::Table => render::created_token(&created),
                }
            }
            TokenCommand::List => {
                let tokens = client
                    .admin
                    .list_enrollment_tokens(client.request(ListEnrollmentTokensRequest {}))
                    .await?
                    .into_inner()
                    .tokens;
                match output {
                    Output::Json => serde_json::to_string_pretty(
                        &tokens.iter().map(render::token_json).collect::<Vec<_>>(),
                    )?,
                    Output::Table => render::tokens_table(&tokens),
                }
            }
            TokenCommand::Revoke { id } => {
                let token = client
                    .admin
                    .revoke_enrollment_token(client.request(RevokeEnrollmentTokenRequest { id }))
                    .await?
                    .into_inner();
                match output {
                    Output::Json => serde_json::to_string_pretty(&render::token_json(&token))?,
                    Output::Table => render::tokens_table(std::slice::from_ref(&token)),
                }
            }
        },
    };
    println!("{}", out.trim_end());
    Ok(())
}

fn render_node(output: Output, node: &steward_proto::admin::v1::Node) -> anyhow::Result<String> {
    Ok(match output {
        Output::Json => serde_json::to_string_pretty(&render::node_json(node))?,
        Output::Table => render::node_detail(node, now_unix()),
    })
}

/// An authenticated admin client.
pub struct Client {
    pub admin: AdminServiceClient<Channel>,
    pub models: ModelServiceClient<Channel>,
    pub trust: TrustServiceClient<Channel>,
    pub audit: AuditServiceClient<Channel>,
    pub deployments: DeploymentServiceClient<Channel>,
    authorization: MetadataValue<tonic::metadata::Ascii>,
}

impl Client {
    pub async fn connect(conn: &Connection) -> anyhow::Result<Self> {
        let token = conn.token.as_deref().context(
            "no admin credential: pass --token or set STEWARD_TOKEN \
             (the control plane prints one on its first start)",
        )?;
        let ca_file = conn
            .ca_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR).join("ca.pem"));
        let ca_pem = std::fs::read_to_string(&ca_file).with_context(|| {
            format!(
                "cannot read the control plane's CA certificate from {} \
                 (pass --ca-file or set STEWARD_CA_FILE)",
                ca_file.display()
            )
        })?;
        let config = client_config(&ServerTrust::CaPem(ca_pem), None)?;
        let channel = connect(&conn.endpoint, config).await?;
        let authorization = format!("Bearer {}", token.trim())
            .parse()
            .context("the admin credential contains characters not allowed in a header")?;
        Ok(Self {
            admin: AdminServiceClient::new(channel.clone()),
            models: ModelServiceClient::new(channel.clone()).max_decoding_message_size(16 << 20),
            trust: TrustServiceClient::new(channel.clone()),
            audit: AuditServiceClient::new(channel.clone()),
            deployments: DeploymentServiceClient::new(channel),
            authorization,
        })
    }

    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        request
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
