//! The agent's side of the node API: long-polling the desired config, posting reports and
//! asking the witness, over mutual TLS with the node's enrollment certificate.

use std::time::Duration;

use hapair_crds::nodeapi::{ApiError, DesiredConfig, LeaseRequest, LeaseResponse, NodeReport, paths};

use crate::engine::WitnessAnswer;
use crate::enroll::{ControllerConfig, error_chain as chain};

/// Why a node-API call failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeApiError {
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("{url}: {message}")]
    Transport { url: String, message: String },
    #[error("{url}: the controller answered {status}: {message}")]
    Refused { url: String, status: u16, message: String },
    #[error("{url}: the answer does not decode: {message}")]
    BadAnswer { url: String, message: String },
}

/// A node-API client for one enrolled node.
#[derive(Clone, Debug)]
pub struct NodeApiClient {
    http: reqwest::Client,
    base: String,
    node: String,
}

impl NodeApiClient {
    /// Reads the CA, certificate and key named by the enrollment.
    pub fn new(config: &ControllerConfig) -> Result<NodeApiClient, NodeApiError> {
        let tls = config.tls().map_err(|e| NodeApiError::Tls(e.to_string()))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| NodeApiError::Tls(chain(&e)))?;
        Ok(NodeApiClient { http, base: config.controller.trim_end_matches('/').to_string(), node: config.node.clone() })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn failure(url: &str, response: reqwest::Response) -> NodeApiError {
        let status = response.status().as_u16();
        let bytes = response.bytes().await.unwrap_or_default();
        let message = serde_json::from_slice::<ApiError>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        NodeApiError::Refused { url: url.to_string(), status, message }
    }

    /// Waits up to `wait` for a bundle whose revision differs from `have`; `None` when
    /// nothing changed.
    pub async fn poll_config(&self, have: Option<u64>, wait: Duration) -> Result<Option<DesiredConfig>, NodeApiError> {
        let url = format!("{}{}", self.base, paths::config(&self.node));
        let mut query = vec![("wait", wait.as_secs().to_string())];
        if let Some(have) = have {
            query.push(("revision", have.to_string()));
        }
        let response = self
            .http
            .get(&url)
            .query(&query)
            .timeout(wait + Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| NodeApiError::Transport { url: url.clone(), message: chain(&e) })?;
        if response.status() == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        if !response.status().is_success() {
            return Err(Self::failure(&url, response).await);
        }
        let bytes =
            response.bytes().await.map_err(|e| NodeApiError::Transport { url: url.clone(), message: chain(&e) })?;
        // Decoded like a bundle file, so a field the agent does not understand is named.
        crate::bundle::decode(&String::from_utf8_lossy(&bytes))
            .map(Some)
            .map_err(|e| NodeApiError::BadAnswer { url, message: e.to_string() })
    }

    pub async fn post_report(&self, report: &NodeReport) -> Result<(), NodeApiError> {
        let url = format!("{}{}", self.base, paths::report(&self.node));
        let response = self
            .http
            .post(&url)
            .json(report)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| NodeApiError::Transport { url: url.clone(), message: chain(&e) })?;
        if response.status().is_success() { Ok(()) } else { Err(Self::failure(&url, response).await) }
    }

    /// One witness request, answered within `timeout` or not at all.
    pub async fn lease(&self, request: &LeaseRequest, timeout: Duration) -> WitnessAnswer {
        let url = format!("{}{}", self.base, paths::LEASE);
        let call = async {
            let response = self.http.post(&url).json(request).send().await.map_err(|e| chain(&e))?;
            if !response.status().is_success() {
                return Err(Self::failure(&url, response).await.to_string());
            }
            response.json::<LeaseResponse>().await.map_err(|e| format!("the answer does not decode: {}", chain(&e)))
        };
        match tokio::time::timeout(timeout, call).await {
            Err(_) => WitnessAnswer::Timeout,
            Ok(Ok(response)) => WitnessAnswer::Response(response),
            Ok(Err(message)) => WitnessAnswer::Failed(message),
        }
    }
}

/// Where a group's witness requests go.
#[derive(Clone, Debug)]
pub enum WitnessPath {
    Controller(NodeApiClient),
    /// Running on a local bundle file: there is no witness to ask.
    Absent,
}

impl WitnessPath {
    pub async fn ask(&self, request: &LeaseRequest, timeout: Duration) -> WitnessAnswer {
        match self {
            WitnessPath::Controller(client) => client.lease(request, timeout).await,
            WitnessPath::Absent => {
                WitnessAnswer::Failed("no controller configured: this agent runs on a local bundle file".into())
            }
        }
    }
}
