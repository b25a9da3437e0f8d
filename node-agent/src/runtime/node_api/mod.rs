//! The agent's side of the node API: long-polling the desired config, posting reports and
//! asking the witness, over mutual TLS with the node's enrollment certificate.
//!
//! Replicated controllers: the client knows every controller endpoint and uses one at a
//! time (sticky). A config poll or report that cannot reach it, or gets a 503 (that
//! controller is not the leader), moves to the leader the 503 names in `x-hapair-leader`
//! when that is one of the configured endpoints, else to the next endpoint, and is retried
//! there at once, once. Witness requests gate failover, so they do not wait for that: each
//! goes to every endpoint at the same time and the first substantive answer (the leader's)
//! wins, its endpoint becoming the current one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hapair_crds::nodeapi::{
    ApiError, DesiredConfig, LEADER_HEADER, LeaseRequest, LeaseResponse, NodeReport, PROTOCOL_HEADER, paths,
};

use crate::agent_config::base_url;
use crate::engine::WitnessAnswer;
use crate::enroll::{ControllerConfig, error_chain as chain};

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

/// Why a node-API call failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeApiError {
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("no controller URL configured")]
    NoController,
    #[error("{url}: {message}")]
    Transport { url: String, message: String },
    #[error("{url}: the controller answered {status}: {message}")]
    Refused { url: String, status: u16, message: String },
    #[error("{url}: the answer does not decode: {message}")]
    BadAnswer { url: String, message: String },
}

/// A failed attempt at one endpoint, and whether another endpoint may do better.
#[derive(Debug)]
struct Failure {
    error: NodeApiError,
    /// Unreachable or not the leader: another controller may answer.
    fail_over: bool,
    /// The leader a 503 named.
    hint: Option<String>,
}

impl From<NodeApiError> for Failure {
    fn from(error: NodeApiError) -> Self {
        let fail_over = match &error {
            NodeApiError::Transport { .. } => true,
            NodeApiError::Refused { status, .. } => *status == 503,
            NodeApiError::Tls(_) | NodeApiError::NoController | NodeApiError::BadAnswer { .. } => false,
        };
        Failure { error, fail_over, hint: None }
    }
}

/// A node-API client for one enrolled node. Clones share the current endpoint, so what one
/// call learns (which controller leads) the next one uses.
#[derive(Clone, Debug)]
pub struct NodeApiClient {
    http: reqwest::Client,
    /// Base URLs, without trailing '/', the preferred one first; never empty.
    endpoints: Arc<[String]>,
    /// Index into `endpoints` of the one in use.
    current: Arc<AtomicUsize>,
    node: String,
    /// The node-API version of the controller's last successful answer; 0 before one.
    agreed: Arc<AtomicU8>,
}

impl NodeApiClient {
    /// Reads the CA, certificate and key named by the enrollment.
    pub fn new(config: &ControllerConfig) -> Result<NodeApiClient, NodeApiError> {
        let endpoints = config.endpoints();
        if endpoints.is_empty() {
            return Err(NodeApiError::NoController);
        }
        let tls = config.tls().map_err(|e| NodeApiError::Tls(e.to_string()))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| NodeApiError::Tls(chain(&e)))?;
        Ok(NodeApiClient {
            http,
            endpoints: endpoints.into(),
            current: Arc::new(AtomicUsize::new(0)),
            node: config.node.clone(),
            agreed: Arc::new(AtomicU8::new(0)),
        })
    }

    /// The node-API version the controller last answered in: what it echoed, or 1 when it
    /// echoed nothing (a controller of the previous release, or this agent speaking 1).
    pub fn agreed_version(&self) -> Option<u8> {
        Some(self.agreed.load(Ordering::SeqCst)).filter(|v| *v > 0)
    }

    /// Notes the version of a successful answer (a refusal says nothing about it).
    fn heard(&self, response: &reqwest::Response) {
        let status = response.status();
        if status.is_success() || status == reqwest::StatusCode::NOT_MODIFIED {
            let echoed = response.headers().get(PROTOCOL_HEADER).and_then(|v| v.to_str().ok());
            let version = echoed.and_then(|v| v.trim().parse::<u8>().ok()).unwrap_or(1);
            self.agreed.store(version, Ordering::SeqCst);
        }
    }

    /// The endpoint in use.
    pub fn base(&self) -> &str {
        &self.endpoints[self.current_index()]
    }

    /// Every endpoint, the preferred one first.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn current_index(&self) -> usize {
        self.current.load(Ordering::SeqCst).min(self.endpoints.len() - 1)
    }

    async fn failure(url: &str, response: reqwest::Response) -> Failure {
        let status = response.status().as_u16();
        let hint = response.headers().get(LEADER_HEADER).and_then(|v| v.to_str().ok()).map(|v| base_url(v).to_string());
        let bytes = response.bytes().await.unwrap_or_default();
        let message = serde_json::from_slice::<ApiError>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        let mut failure = Failure::from(NodeApiError::Refused { url: url.to_string(), status, message });
        failure.hint = hint;
        failure
    }

    /// Moves off endpoint `from` after `failure`: to the hinted leader when it is one of
    /// ours, else to the next. Returns false when there is nowhere else to go. Another call
    /// may have moved already; then its choice stands.
    fn fail_over(&self, from: usize, failure: &Failure) -> bool {
        let n = self.endpoints.len();
        if n < 2 {
            return false;
        }
        let hinted = failure.hint.as_deref().and_then(|hint| {
            let found = self.endpoints.iter().position(|e| e == hint);
            if found.is_none() {
                // Only a configured controller is trusted with this node's traffic.
                tracing::debug!(hint, "a controller names a leader this agent is not configured with; not followed");
            }
            found
        });
        let to = hinted.filter(|i| *i != from).unwrap_or((from + 1) % n);
        if self.current.compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            tracing::info!(
                from = %self.endpoints[from],
                to = %self.endpoints[to],
                reason = %failure.error,
                hinted = hinted == Some(to),
                "switching controllers"
            );
        }
        true
    }

    /// Runs `call` against the current endpoint; on a failure another controller may not
    /// have, fails over and runs it once more at once on the new current endpoint.
    async fn with_failover<T, F, Fut>(&self, call: F) -> Result<T, NodeApiError>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut retried = false;
        loop {
            let index = self.current_index();
            let failure = match call(self.endpoints[index].clone()).await {
                Ok(value) => return Ok(value),
                Err(failure) => failure,
            };
            if !failure.fail_over || !self.fail_over(index, &failure) || retried {
                return Err(failure.error);
            }
            retried = true;
        }
    }

    /// Waits up to `wait` for a bundle whose revision differs from `have`; `None` when
    /// nothing changed.
    pub async fn poll_config(&self, have: Option<u64>, wait: Duration) -> Result<Option<DesiredConfig>, NodeApiError> {
        self.with_failover(|base| self.poll_config_at(base, have, wait)).await
    }

    async fn poll_config_at(
        &self,
        base: String,
        have: Option<u64>,
        wait: Duration,
    ) -> Result<Option<DesiredConfig>, Failure> {
        let url = format!("{base}{}", paths::config(&self.node));
        let mut query = vec![("wait", wait.as_secs().to_string())];
        if let Some(have) = have {
            query.push(("revision", have.to_string()));
        }
        let response = self
            .http
            .get(&url)
            .headers(announce())
            .query(&query)
            .timeout(wait + Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| NodeApiError::Transport { url: url.clone(), message: chain(&e) })?;
        self.heard(&response);
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
            .map_err(|e| NodeApiError::BadAnswer { url, message: e.to_string() }.into())
    }

    pub async fn post_report(&self, report: &NodeReport) -> Result<(), NodeApiError> {
        self.with_failover(|base| self.post_report_at(base, report)).await
    }

    async fn post_report_at(&self, base: String, report: &NodeReport) -> Result<(), Failure> {
        let url = format!("{base}{}", paths::report(&self.node));
        let response = self
            .http
            .post(&url)
            .headers(announce())
            .json(report)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| NodeApiError::Transport { url: url.clone(), message: chain(&e) })?;
        self.heard(&response);
        if response.status().is_success() { Ok(()) } else { Err(Self::failure(&url, response).await) }
    }

    /// One witness request, answered within `timeout` or not at all: sent to every
    /// endpoint at once, the first answer that is neither a 503 nor a transport failure
    /// is the answer. Failed (naming every endpoint) only when all have failed.
    pub async fn lease(&self, request: &LeaseRequest, timeout: Duration) -> WitnessAnswer {
        let mut calls: FuturesUnordered<_> = (0..self.endpoints.len())
            .map(|index| async move { (index, self.lease_at(&self.endpoints[index], request).await) })
            .collect();
        let first_answer = async {
            let mut failures = Vec::new();
            while let Some((index, outcome)) = calls.next().await {
                match outcome {
                    Ok(answer) => {
                        self.answered_by(index);
                        return answer;
                    }
                    Err(message) => failures.push((index, message)),
                }
            }
            failures.sort();
            WitnessAnswer::Failed(failures.into_iter().map(|(_, m)| m).collect::<Vec<_>>().join("; "))
        };
        tokio::time::timeout(timeout, first_answer).await.unwrap_or(WitnessAnswer::Timeout)
    }

    /// One endpoint's witness answer; `Err` (its message naming the URL) when that
    /// controller could not be reached or is not the leader.
    async fn lease_at(&self, base: &str, request: &LeaseRequest) -> Result<WitnessAnswer, String> {
        let url = format!("{base}{}", paths::LEASE);
        let response = match self.http.post(&url).headers(announce()).json(request).send().await {
            Ok(response) => response,
            Err(e) => return Err(format!("{url}: {}", chain(&e))),
        };
        if !response.status().is_success() {
            let failure = Self::failure(&url, response).await;
            return if failure.fail_over {
                Err(failure.error.to_string())
            } else {
                Ok(WitnessAnswer::Failed(failure.error.to_string()))
            };
        }
        match response.json::<LeaseResponse>().await {
            Ok(answer) => Ok(WitnessAnswer::Response(answer)),
            Err(e) if e.is_decode() => {
                Ok(WitnessAnswer::Failed(format!("{url}: the answer does not decode: {}", chain(&e))))
            }
            Err(e) => Err(format!("{url}: {}", chain(&e))),
        }
    }

    /// The witness answered from endpoint `index`: that is the leader, use it from now on.
    fn answered_by(&self, index: usize) {
        let before = self.current.swap(index, Ordering::SeqCst);
        if before != index {
            tracing::info!(
                from = %self.endpoints[before.min(self.endpoints.len() - 1)],
                to = %self.endpoints[index],
                "switching controllers: this one answered the witness request"
            );
        }
    }
}

/// The node-API version header: from version 2 on every request names the version it
/// speaks; version 1 (the previous release, or `--protocol-version 1`) sends none.
fn announce() -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    let version = crate::protocol::highest();
    if version >= 2 {
        headers.insert(PROTOCOL_HEADER, reqwest::header::HeaderValue::from(u16::from(version)));
    }
    headers
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
