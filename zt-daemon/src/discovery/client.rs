//! The Kubernetes client: the kubeconfig file the node config names, else the in-cluster
//! service account, else `KUBECONFIG`.
use std::path::PathBuf;

use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::config::KubernetesDiscovery;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("kubeconfig {path}: {error}")]
    Kubeconfig { path: PathBuf, error: String },
    #[error(
        "no Kubernetes client configuration: not in a pod ({in_cluster}), and KUBECONFIG: {kubeconfig}"
    )]
    NoConfig {
        in_cluster: String,
        kubeconfig: String,
    },
    #[error("Kubernetes client: {0}")]
    Client(String),
}

/// The client `config` describes: its kubeconfig file, else in-cluster, else `KUBECONFIG`.
pub async fn client(config: &KubernetesDiscovery) -> Result<Client, DiscoveryError> {
    let options = KubeConfigOptions::default();
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let named = |error: String| DiscoveryError::Kubeconfig {
                path: path.clone(),
                error,
            };
            let file = Kubeconfig::read_from(path).map_err(|e| named(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| named(e.to_string()))?
        }
        None => match kube::Config::incluster() {
            Ok(c) => c,
            Err(in_cluster) => kube::Config::from_kubeconfig(&options).await.map_err(|e| {
                DiscoveryError::NoConfig {
                    in_cluster: in_cluster.to_string(),
                    kubeconfig: e.to_string(),
                }
            })?,
        },
    };
    Client::try_from(kube_config).map_err(|e| DiscoveryError::Client(e.to_string()))
}
