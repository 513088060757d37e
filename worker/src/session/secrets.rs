//! Build secrets over a session (`moby.buildkit.secrets.v1.Secrets`,
//! shared/design/buildkit-wire.md §6.4): the client serves them ([`SecretStore`]) and the
//! daemon asks for each id a RUN step mounts ([`SessionSecrets`]). Values are never logged.

use std::collections::HashMap;
use std::sync::Arc;

use kiln_proto::moby::buildkit::secrets::v1::secrets_client::SecretsClient;
use kiln_proto::moby::buildkit::secrets::v1::secrets_server::{Secrets, SecretsServer};
use kiln_proto::moby::buildkit::secrets::v1::{GetSecretRequest, GetSecretResponse};
use tonic::{Request, Response, Status};

use super::manager::{SessionManager, LOOKUP_WAIT};

/// The method the daemon calls.
pub const GET_SECRET: &str = "/moby.buildkit.secrets.v1.Secrets/GetSecret";

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

/// Daemon side: the secrets of the client behind session `id`.
#[derive(Debug, Clone)]
pub struct SessionSecrets {
    sessions: SessionManager,
    id: String,
}

impl SessionSecrets {
    /// Secrets from session `id` of `sessions`.
    pub fn new(sessions: SessionManager, id: impl Into<String>) -> SessionSecrets {
        SessionSecrets {
            sessions,
            id: id.into(),
        }
    }
}

#[async_trait::async_trait]
impl crate::control::SecretSource for SessionSecrets {
    async fn get(&self, id: &str) -> Result<Option<Vec<u8>>, String> {
        let session = self
            .sessions
            .get(&self.id, LOOKUP_WAIT)
            .await
            .ok_or_else(|| format!("no active session {:?} to ask for it", self.id))?;
        if !session.headers.supports(GET_SECRET) {
            return Ok(None);
        }
        let mut client = SecretsClient::new(session.channel.clone());
        let req = GetSecretRequest {
            id: id.to_string(),
            annotations: Default::default(),
        };
        match tokio::time::timeout(std::time::Duration::from_secs(60), client.get_secret(req)).await
        {
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
