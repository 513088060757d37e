//! The services a client attaches to its session for the daemon to call: build secrets
//! (`moby.buildkit.secrets.v1.Secrets`, shared/design/buildkit-wire.md §6.4) and registry
//! credentials (`moby.filesync.v1.Auth`, §6.3), so neither has to live on the worker.
//!
//! * Client side: [`SecretStore`] and [`AuthProvider`] (from the client's docker config).
//! * Daemon side: [`SessionClient`], the build's [`crate::control::SessionServices`].
//!
//! Secret values and passwords are never logged.

use std::collections::HashMap;
use std::sync::Arc;

use kiln_proto::moby::buildkit::secrets::v1::secrets_client::SecretsClient;
use kiln_proto::moby::buildkit::secrets::v1::secrets_server::{Secrets, SecretsServer};
use kiln_proto::moby::buildkit::secrets::v1::{GetSecretRequest, GetSecretResponse};
use kiln_proto::moby::filesync::v1::auth_client::AuthClient;
use kiln_proto::moby::filesync::v1::auth_server::{Auth, AuthServer};
use kiln_proto::moby::filesync::v1::{
    CredentialsRequest, CredentialsResponse, FetchTokenRequest, FetchTokenResponse,
};
use oci_client::secrets::RegistryAuth;
use tonic::{Request, Response, Status};

use super::manager::{SessionManager, LOOKUP_WAIT};

/// The secrets method the daemon calls.
pub const GET_SECRET: &str = "/moby.buildkit.secrets.v1.Secrets/GetSecret";
/// The credentials method the daemon calls.
pub const CREDENTIALS: &str = "/moby.filesync.v1.Auth/Credentials";
/// The token method the daemon calls first for token-auth registries.
pub const FETCH_TOKEN: &str = "/moby.filesync.v1.Auth/FetchToken";
/// How long one call to the client may take (BuildKit: 60 s).
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Client side: secrets by id, served to the daemon; unknown ids are `NotFound`.
#[derive(Clone, Default)]
pub struct SecretStore {
    secrets: Arc<HashMap<String, Vec<u8>>>,
}

impl std::fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Ids only: values never reach a log.
        f.debug_struct("SecretStore")
            .field("ids", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SecretStore {
    /// A store serving `secrets`.
    pub fn new(secrets: HashMap<String, Vec<u8>>) -> SecretStore {
        SecretStore {
            secrets: Arc::new(secrets),
        }
    }

    /// The tonic service.
    pub fn into_service(self) -> SecretsServer<SecretStore> {
        SecretsServer::new(self)
    }
}

#[tonic::async_trait]
impl Secrets for SecretStore {
    async fn get_secret(
        &self,
        request: Request<GetSecretRequest>,
    ) -> Result<Response<GetSecretResponse>, Status> {
        let id = request.into_inner().id;
        match self.secrets.get(&id) {
            Some(data) => Ok(Response::new(GetSecretResponse { data: data.clone() })),
            None => Err(Status::not_found(format!("secret {id} not found"))),
        }
    }
}

/// Client side: registry credentials from the client's docker config (and its credential
/// helpers), served per host, and `FetchToken`: the token exchange done here with those
/// credentials, so a token-auth registry's password never leaves the client. The
/// token-authority calls answer `Unimplemented` ("not offered").
#[derive(Debug, Clone, Default)]
pub struct AuthProvider {
    config: crate::source::image::RegistryConfig,
}

impl AuthProvider {
    /// Credentials as `config` finds them.
    pub fn new(config: crate::source::image::RegistryConfig) -> AuthProvider {
        AuthProvider { config }
    }

    /// The tonic service.
    pub fn into_service(self) -> AuthServer<AuthProvider> {
        AuthServer::new(self)
    }
}

#[tonic::async_trait]
impl Auth for AuthProvider {
    async fn credentials(
        &self,
        request: Request<CredentialsRequest>,
    ) -> Result<Response<CredentialsResponse>, Status> {
        let host = request.into_inner().host;
        let config = self.config.clone();
        let auth = tokio::task::spawn_blocking(move || config.auth_for(&host))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let (username, secret) = match auth {
            RegistryAuth::Basic(u, p) => (u, p),
            RegistryAuth::Bearer(t) => (String::new(), t),
            RegistryAuth::Anonymous => (String::new(), String::new()),
        };
        Ok(Response::new(CredentialsResponse { username, secret }))
    }

    async fn fetch_token(
        &self,
        request: Request<FetchTokenRequest>,
    ) -> Result<Response<FetchTokenResponse>, Status> {
        let r = request.into_inner();
        let config = self.config.clone();
        let host = r.host.clone();
        let auth = tokio::task::spawn_blocking(move || config.auth_for(&host))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let req = crate::source::image::token::TokenRequest {
            host: r.host,
            realm: r.realm,
            service: r.service,
            scopes: r.scopes,
        };
        let token = crate::source::image::token::exchange(&req, &auth)
            .await
            .map_err(Status::permission_denied)?;
        let issued_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Ok(Response::new(FetchTokenResponse {
            token: token.token,
            expires_in: token.expires_in as i64,
            issued_at,
        }))
    }
}

/// Daemon side: what the client behind session `id` serves, for one build.
#[derive(Debug, Clone)]
pub struct SessionClient {
    sessions: SessionManager,
    id: String,
}

impl SessionClient {
    /// The client of session `id` of `sessions`.
    pub fn new(sessions: SessionManager, id: impl Into<String>) -> SessionClient {
        SessionClient {
            sessions,
            id: id.into(),
        }
    }

    async fn session(&self) -> Result<super::manager::Session, String> {
        self.sessions
            .get(&self.id, LOOKUP_WAIT)
            .await
            .ok_or_else(|| format!("no active session {:?} to ask", self.id))
    }
}

#[async_trait::async_trait]
impl crate::control::SessionServices for SessionClient {
    async fn registry_auth(&self, host: &str) -> Result<Option<RegistryAuth>, String> {
        let session = self.session().await?;
        if !session.headers.supports(CREDENTIALS) {
            return Ok(None);
        }
        let mut client = AuthClient::new(session.channel.clone());
        let req = CredentialsRequest {
            host: host.to_string(),
        };
        match tokio::time::timeout(CALL_TIMEOUT, client.credentials(req)).await {
            Ok(Ok(resp)) => {
                let r = resp.into_inner();
                Ok(match (r.username.is_empty(), r.secret.is_empty()) {
                    (_, true) => None,
                    (true, false) => Some(RegistryAuth::Bearer(r.secret)),
                    (false, false) => Some(RegistryAuth::Basic(r.username, r.secret)),
                })
            }
            Ok(Err(s))
                if matches!(s.code(), tonic::Code::NotFound | tonic::Code::Unimplemented) =>
            {
                Ok(None)
            }
            Ok(Err(s)) => Err(format!("the client's Auth service: {}", s.message())),
            Err(_) => Err("the client's Auth service did not answer in 60 s".into()),
        }
    }

    async fn fetch_token(
        &self,
        req: &crate::source::image::token::TokenRequest,
    ) -> Result<Option<crate::source::image::token::Token>, String> {
        let session = self.session().await?;
        if !session.headers.supports(FETCH_TOKEN) {
            return Ok(None);
        }
        let mut client = AuthClient::new(session.channel.clone());
        let msg = FetchTokenRequest {
            client_id: "kiln".to_string(),
            host: req.host.clone(),
            realm: req.realm.clone(),
            service: req.service.clone(),
            scopes: req.scopes.clone(),
        };
        match tokio::time::timeout(CALL_TIMEOUT, client.fetch_token(msg)).await {
            Ok(Ok(resp)) => {
                let r = resp.into_inner();
                Ok(Some(crate::source::image::token::Token {
                    token: r.token,
                    expires_in: r.expires_in.max(0) as u64,
                }))
            }
            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => Ok(None),
            Ok(Err(s)) => Err(format!("the client's Auth service: {}", s.message())),
            Err(_) => Err("the client's Auth service did not answer in 60 s".into()),
        }
    }

    async fn has_ssh_agent(&self, id: &str) -> Result<bool, String> {
        let session = self.session().await?;
        if !session.headers.supports(super::sshforward::CHECK_AGENT) {
            return Ok(false);
        }
        match tokio::time::timeout(
            CALL_TIMEOUT,
            super::sshforward::check_agent(session.channel.clone(), id),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err("the client's SSH service did not answer in 60 s".into()),
        }
    }

    async fn ssh_agent(&self, id: &str) -> Result<Option<super::sshforward::AgentConn>, String> {
        let session = self.session().await?;
        if !session.headers.supports(super::sshforward::FORWARD_AGENT) {
            return Ok(None);
        }
        super::sshforward::forward_agent(session.channel.clone(), id)
            .await
            .map(Some)
    }

    async fn secret(&self, id: &str) -> Result<Option<Vec<u8>>, String> {
        let session = self.session().await?;
        if !session.headers.supports(GET_SECRET) {
            return Ok(None);
        }
        let mut client = SecretsClient::new(session.channel.clone());
        let req = GetSecretRequest {
            id: id.to_string(),
            annotations: Default::default(),
        };
        match tokio::time::timeout(CALL_TIMEOUT, client.get_secret(req)).await {
            Ok(Ok(resp)) => Ok(Some(resp.into_inner().data)),
            Ok(Err(s))
                if matches!(s.code(), tonic::Code::NotFound | tonic::Code::Unimplemented) =>
            {
                Ok(None)
            }
            Ok(Err(s)) => Err(format!("the client's Secrets service: {}", s.message())),
            Err(_) => Err("the client's Secrets service did not answer in 60 s".into()),
        }
    }
}
