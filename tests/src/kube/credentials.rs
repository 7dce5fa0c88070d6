//! Agents' credentials: service-account tokens from the TokenRequest API, in kubeconfigs with
//! `tokenFile`, and the clients made from kubeconfig text.
use std::path::PathBuf;

use ::kube::{
    Api, Client,
    api::PostParams,
    config::{KubeConfigOptions, Kubeconfig},
};
use anyhow::Context as _;
use base64::Engine as _;
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::ServiceAccount,
};

use super::{AGENT_NAMESPACE, API_ADDR, Cluster, RESTRICTED_SERVICE_ACCOUNT};

/// An agent's credentials: a service-account token file and a kubeconfig that reads it.
#[derive(Debug, Clone)]
pub struct AgentCredentials {
    pub namespace: String,
    pub service_account: String,
    pub kubeconfig: PathBuf,
    pub token_file: PathBuf,
}

/// A kubeconfig for `server`, trusting the cluster CA, with the user's `credential` line
/// (`token: ...` or `tokenFile: ...`).
pub(super) fn kubeconfig_text(server: &str, ca_pem: &str, credential: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: zt-test\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: zt-test\n  user:\n    {credential}\n\
         contexts:\n- name: zt-test\n  context:\n    cluster: zt-test\n    user: zt-test\n\
         current-context: zt-test\n"
    )
}

/// A client from kubeconfig text, its server replaced by `server` if given.
pub(super) async fn client_from_kubeconfig(
    text: &str,
    server: Option<&str>,
) -> anyhow::Result<Client> {
    let mut kubeconfig = Kubeconfig::from_yaml(text)?;
    if let Some(server) = server {
        for cluster in &mut kubeconfig.clusters {
            if let Some(c) = &mut cluster.cluster {
                c.server = Some(server.to_owned());
            }
        }
    }
    let config =
        ::kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

impl Cluster {
    /// Mints a token for service account `namespace/name` (TokenRequest, valid one hour) and
    /// writes it and a kubeconfig for an agent: server https://10.200.0.1:6443, the cluster CA,
    /// `tokenFile` pointing at the token.
    pub fn agent_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<AgentCredentials> {
        let base = format!("{namespace}-{name}");
        let creds = AgentCredentials {
            namespace: namespace.into(),
            service_account: name.into(),
            kubeconfig: self.dir.join(format!("{base}.kubeconfig")),
            token_file: self.dir.join(format!("{base}.token")),
        };
        self.rotate_token(&creds)?;
        let user = format!("tokenFile: {}", creds.token_file.display());
        std::fs::write(
            &creds.kubeconfig,
            kubeconfig_text(&format!("https://{API_ADDR}"), &self.ca_pem, &user),
        )?;
        Ok(creds)
    }

    /// Mints a fresh token for `creds` and replaces its token file (write, then rename).
    pub fn rotate_token(&self, creds: &AgentCredentials) -> anyhow::Result<()> {
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: Vec::new(),
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &creds.namespace);
        let minted: TokenRequest = self
            .rt
            .block_on(api.create_subresource(
                "token",
                &creds.service_account,
                &PostParams::default(),
                serde_json::to_vec(&request)?,
            ))
            .with_context(|| {
                format!(
                    "TokenRequest for {}/{}",
                    creds.namespace, creds.service_account
                )
            })?;
        let token = minted.status.context("TokenRequest without status")?.token;
        let tmp = creds.token_file.with_extension("token.tmp");
        std::fs::write(&tmp, token)?;
        std::fs::rename(&tmp, &creds.token_file)?;
        Ok(())
    }

    /// Credentials of an agent whose role may get and watch pods and namespaces but not list
    /// pods (deploy/ must have been applied: the service account lives in zt-system).
    pub fn restricted_agent_kubeconfig(&self) -> anyhow::Result<AgentCredentials> {
        let name = RESTRICTED_SERVICE_ACCOUNT;
        self.create_service_account(AGENT_NAMESPACE, name)?;
        self.apply_yaml(
            &format!(
                "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: {name}\nrules:\n\
                 - apiGroups: [\"\"]\n  resources: [\"namespaces\"]\n  verbs: [\"get\", \"list\", \"watch\"]\n\
                 - apiGroups: [\"\"]\n  resources: [\"pods\"]\n  verbs: [\"get\", \"watch\"]\n---\n\
                 apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: {name}\n\
                 roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: {name}\n\
                 subjects:\n- kind: ServiceAccount\n  name: {name}\n  namespace: {AGENT_NAMESPACE}\n"
            ),
            None,
        )?;
        self.agent_kubeconfig(AGENT_NAMESPACE, name)
    }
}
