//! The etcd connection options every command shares.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::errors::{Origin, Place};
use coord::agent::manifest::{DEFAULT_NAMESPACE, Manifest, PasswordSource};
use coord::etcd::{Client, ConnectOptions, TlsFiles};

/// Where etcd is and how to talk to it. Flags win over environment
/// variables, which win over `--manifest`'s `[etcd]` section.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "etcd connection")]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "COORD_ENDPOINTS", value_delimiter = ',', global = true)]
    endpoints: Vec<String>,
    /// Reuse the `[etcd]` and `[agent]` settings of this manifest.
    #[arg(long, env = "COORD_MANIFEST", value_name = "FILE", global = true)]
    manifest: Option<PathBuf>,
    /// Key namespace (default: the manifest's, else /coord).
    #[arg(long, env = "COORD_NAMESPACE", global = true)]
    namespace: Option<String>,
    /// CA certificate (PEM) to verify etcd's TLS certificate.
    #[arg(long, env = "COORD_CACERT", value_name = "FILE", global = true)]
    cacert: Option<PathBuf>,
    /// Client certificate (PEM) for TLS client authentication.
    #[arg(
        long,
        env = "COORD_CERT",
        value_name = "FILE",
        global = true,
        requires = "key"
    )]
    cert: Option<PathBuf>,
    /// Client key (PEM) for TLS client authentication.
    #[arg(
        long,
        env = "COORD_KEY",
        value_name = "FILE",
        global = true,
        requires = "cert"
    )]
    key: Option<PathBuf>,
    /// etcd user name.
    #[arg(long, env = "COORD_USER", global = true)]
    user: Option<String>,
    /// File holding the etcd password (else $COORD_PASSWORD).
    #[arg(long, env = "COORD_PASSWORD_FILE", value_name = "FILE", global = true)]
    password_file: Option<PathBuf>,
    /// Time allowed to connect to an endpoint.
    #[arg(long, value_parser = humantime::parse_duration, global = true)]
    dial_timeout: Option<Duration>,
    /// Time allowed for one request.
    #[arg(long, value_parser = humantime::parse_duration, global = true)]
    request_timeout: Option<Duration>,
}

impl EtcdArgs {
    /// The resolved connection options and namespace.
    pub fn resolve(&self) -> anyhow::Result<(ConnectOptions, String)> {
        let manifest = match &self.manifest {
            Some(path) => Some(Manifest::load(path)?),
            None => None,
        };
        let (mut opts, mut origin) = match &manifest {
            Some(m) => (
                m.connect_options().with_context(|| {
                    format!("using the [etcd] section of `{}`", m.path.display())
                })?,
                Origin::Manifest(m.path.clone()),
            ),
            None => (
                ConnectOptions::new(vec!["http://127.0.0.1:2379".to_owned()]),
                Origin::Default,
            ),
        };
        if !self.endpoints.is_empty() {
            opts.endpoints = self.endpoints.clone();
            origin = self.endpoints_origin();
        }
        super::errors::remember(Place {
            endpoints: opts.endpoints.clone(),
            origin,
        });
        if self.cacert.is_some() || self.cert.is_some() {
            opts.tls = Some(TlsFiles {
                ca: self.cacert.clone(),
                cert: self.cert.clone(),
                key: self.key.clone(),
            });
        }
        if let Some(user) = &self.user {
            let source = match &self.password_file {
                Some(file) => PasswordSource::File(file.clone()),
                None => PasswordSource::Env("COORD_PASSWORD".to_owned()),
            };
            opts.username = Some(user.clone());
            opts.password = Some(source.read()?);
        }
        if let Some(t) = self.dial_timeout {
            opts.dial_timeout = t;
        }
        if let Some(t) = self.request_timeout {
            opts.request_timeout = t;
        }
        let namespace = self
            .namespace
            .clone()
            .or_else(|| manifest.map(|m| m.agent.namespace))
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        Ok((opts, namespace))
    }

    /// A client and the namespace. Nothing is dialled yet: an etcd that
    /// cannot be reached shows at the first request.
    pub async fn connect(&self) -> anyhow::Result<(Client, String)> {
        let (opts, namespace) = self.resolve()?;
        let client = Client::connect(&opts).await.with_context(|| {
            format!(
                "cannot use the etcd connection settings for {}",
                opts.endpoints.join(",")
            )
        })?;
        Ok((client, namespace))
    }

    /// Whether `--endpoints` or `COORD_ENDPOINTS` gave the endpoints (clap
    /// fills the one field from either). The variable's own value means
    /// the variable; a flag given beside it wins and differs from it.
    fn endpoints_origin(&self) -> Origin {
        let from_env = std::env::var("COORD_ENDPOINTS")
            .ok()
            .map(|v| v.split(',').map(str::to_owned).collect::<Vec<String>>());
        if from_env.as_ref() == Some(&self.endpoints) {
            Origin::Env
        } else {
            Origin::Flag
        }
    }
}
