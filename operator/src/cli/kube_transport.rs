//! The CLI against a cluster: status and describe read the HaGroup and ReplicatedVolume
//! objects (and the group's Events), and admin actions are annotations on the HaGroup
//! that the operator answers in `status.lastAction`.
//!
//! Writing an action annotation is a compare-and-swap on the object's `resourceVersion`, and
//! refused while another request of the same kind is still pending, so two admins cannot
//! silently overwrite each other's requests.

use std::time::Duration;

use hapair_crds::condition::{ConditionStatus, find, types};
use hapair_crds::nodeapi::{ActionOutcome, AdminActionKind, EventRecord, EventType, GroupKey};
use hapair_crds::{HaGroup, ReplicatedVolume};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event as KubeEvent;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use rand::RngCore;

use crate::cli::transport::{CliError, Transport};
use crate::controller::views::{ActionRequest, ActionView, GroupView, GroupsOverview, VirtualIpView, VolumeView};
use crate::k8s::annotations::{self, annotation_for};
use crate::k8s::pki_secret;
use crate::k8s::state_secrets::SECRET_ROLE_LABEL;
use crate::k8s::token_secret::TokenSecret;
use crate::pki::tokens::enroll_instructions;
use crate::status::events::GroupEvent;
use crate::support::timestamp::{format_millis, now_millis};

/// Events shown by `describe`.
const EVENTS_SHOWN: usize = 20;

/// The cluster behind the current kubeconfig context (or the pod's service account).
pub struct KubeTransport {
    client: Client,
    /// What each request this CLI wrote asked for: `status.lastAction` names the action
    /// only by its label.
    submitted: std::sync::Mutex<std::collections::BTreeMap<String, AdminActionKind>>,
}

impl std::fmt::Debug for KubeTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeTransport").field("namespace", &self.client.default_namespace()).finish()
    }
}

fn api_error(what: String) -> impl FnOnce(kube::Error) -> CliError {
    move |e| match e {
        kube::Error::Api(status) => {
            CliError::Api { status: status.code, message: format!("{what}: {}", status.message) }
        }
        other => CliError::Unreachable { url: "the Kubernetes API".into(), message: format!("{what}: {other}") },
    }
}

fn key_of(group: &HaGroup) -> GroupKey {
    GroupKey::new(group.namespace().unwrap_or_default(), group.name_any())
}

/// A HaGroup object as `status` and `describe` show it.
pub fn group_view(group: &HaGroup, volumes: &[ReplicatedVolume], events: Vec<GroupEvent>) -> GroupView {
    let key = key_of(group);
    let status = group.status.clone().unwrap_or_default();
    let error = find(&status.conditions, types::VALID)
        .filter(|c| c.status == ConditionStatus::False)
        .map(|c| c.message.clone());
    let volumes = volumes
        .iter()
        .filter(|v| v.namespace().as_deref() == Some(key.namespace.as_str()) && v.spec.group == key.name)
        .map(|v| VolumeView { name: v.name_any(), status: v.status.clone().unwrap_or_default() })
        .collect();
    GroupView {
        nodes: group.spec.nodes.iter().map(|n| n.name.clone()).collect(),
        witness: group.spec.witness.mode,
        error,
        deleting: group.metadata.deletion_timestamp.is_some(),
        status,
        volumes,
        virtual_ips: VirtualIpView::of_spec(&group.spec),
        node_details: Vec::new(),
        events,
        key,
    }
}

/// A Kubernetes Event about a group as `describe` lists it. Agents' events carry their node
/// in front of the note (`node: message`).
pub fn group_event(event: &KubeEvent) -> GroupEvent {
    let time = event
        .series
        .as_ref()
        .map(|s| s.last_observed_time.0.to_string())
        .or_else(|| event.event_time.as_ref().map(|t| t.0.to_string()))
        .or_else(|| event.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()))
        .unwrap_or_default();
    let note = event.note.clone().unwrap_or_default();
    let (node, message) = match (event.action.as_deref(), note.split_once(": ")) {
        (Some("AgentReport"), Some((node, rest))) => (Some(node.to_string()), rest.to_string()),
        _ => (None, note),
    };
    GroupEvent {
        node,
        event: EventRecord {
            time,
            type_: if event.type_.as_deref() == Some("Warning") { EventType::Warning } else { EventType::Normal },
            reason: event.reason.clone().unwrap_or_default(),
            message,
            epoch: 0,
        },
    }
}

impl KubeTransport {
    pub fn new(client: Client) -> Self {
        KubeTransport { client, submitted: std::sync::Mutex::new(std::collections::BTreeMap::new()) }
    }

    fn remember(&self, id: &str, kind: &AdminActionKind) {
        self.submitted.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), kind.clone());
    }

    fn recall(&self, id: &str) -> Option<AdminActionKind> {
        self.submitted.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    pub fn default_namespace(&self) -> &str {
        self.client.default_namespace()
    }

    async fn get_group(&self, key: &GroupKey) -> Result<HaGroup, CliError> {
        let api: Api<HaGroup> = Api::namespaced(self.client.clone(), &key.namespace);
        api.get_opt(&key.name)
            .await
            .map_err(api_error(format!("reading HaGroup {key}")))?
            .ok_or_else(|| CliError::Config(format!("no HaGroup {key}")))
    }

    async fn events(&self, key: &GroupKey) -> Result<Vec<GroupEvent>, CliError> {
        let api: Api<KubeEvent> = Api::namespaced(self.client.clone(), &key.namespace);
        let selector = format!("regarding.kind=HaGroup,regarding.name={}", key.name);
        let list = api
            .list(&ListParams::default().fields(&selector))
            .await
            .map_err(api_error(format!("listing the Events of HaGroup {key}")))?;
        let mut events: Vec<GroupEvent> = list.items.iter().map(group_event).collect();
        events.sort_by(|a, b| a.event.time.cmp(&b.event.time));
        let skip = events.len().saturating_sub(EVENTS_SHOWN);
        Ok(events.split_off(skip))
    }

    /// Issues an enrollment token into the operator's token Secret (found by its label,
    /// in `namespace` or anywhere) and returns what to run on the node.
    pub async fn create_token(&self, node: &str, ttl: Duration, namespace: Option<&str>) -> Result<String, CliError> {
        let find = |role: &'static str| {
            let client = self.client.clone();
            async move {
                let api: Api<Secret> = match namespace {
                    Some(ns) => Api::namespaced(client, ns),
                    None => Api::all(client),
                };
                let selector = format!("{SECRET_ROLE_LABEL}={role}");
                let list = api
                    .list_metadata(&ListParams::default().labels(&selector))
                    .await
                    .map_err(api_error(format!("finding the operator's {role} Secret")))?;
                match list.items.as_slice() {
                    [one] => Ok((one.namespace().unwrap_or_default(), one.name_any())),
                    [] => Err(CliError::Config(format!(
                        "no Secret labelled {selector}{}: is the hapair operator installed and has it started?",
                        namespace.map(|n| format!(" in namespace {n}")).unwrap_or_default()
                    ))),
                    several => Err(CliError::Config(format!(
                        "{} Secrets labelled {selector} ({}); name the operator's namespace with --operator-namespace",
                        several.len(),
                        several
                            .iter()
                            .map(|s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))),
                }
            }
        };
        let (ns, pki_name) = find("pki").await?;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        let ca = pki_secret::load(&secrets, &pki_name)
            .await
            .map_err(|e| CliError::Config(e.to_string()))?
            .ok_or_else(|| CliError::Config(format!("Secret {ns}/{pki_name} vanished")))?;
        let tokens_name = crate::k8s::run::secret_names(&pki_name).0;
        let now = now_millis();
        let token = TokenSecret::new(secrets, &tokens_name, None)
            .issue(node, ttl, now)
            .await
            .map_err(|e| CliError::Config(e.to_string()))?;
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let service = pki_name.strip_suffix("-pki").unwrap_or(&pki_name);
        let controller = format!("https://{service}.{ns}.svc:8443");
        Ok(enroll_instructions(
            &token,
            node,
            &format_millis(now.saturating_add(ttl_ms)),
            &ca.fingerprint(),
            &controller,
        ))
    }
}

impl Transport for KubeTransport {
    async fn groups(&self) -> Result<GroupsOverview, CliError> {
        let groups: Api<HaGroup> = Api::all(self.client.clone());
        let volumes: Api<ReplicatedVolume> = Api::all(self.client.clone());
        let groups = groups.list(&ListParams::default()).await.map_err(api_error("listing HaGroups".into()))?;
        let volumes =
            volumes.list(&ListParams::default()).await.map_err(api_error("listing ReplicatedVolumes".into()))?;
        let mut views: Vec<GroupView> =
            groups.items.iter().map(|g| group_view(g, &volumes.items, Vec::new())).collect();
        views.sort_by(|a, b| a.key.cmp(&b.key));
        let errors = views.iter().filter_map(|v| v.error.clone()).collect();
        let deleting_volumes = volumes
            .items
            .iter()
            .filter(|v| v.metadata.deletion_timestamp.is_some())
            .filter_map(|v| {
                let blocked = v.status.as_ref().and_then(|s| {
                    hapair_crds::condition::find(&s.conditions, hapair_crds::condition::types::DELETION_BLOCKED)
                })?;
                let key = GroupKey::new(v.namespace().unwrap_or_default(), v.name_any());
                Some(format!("{key}: {}", blocked.message))
            })
            .collect();
        Ok(GroupsOverview { groups: views, errors, deleting_volumes })
    }

    async fn group(&self, key: &GroupKey) -> Result<GroupView, CliError> {
        let group = self.get_group(key).await?;
        let volumes: Api<ReplicatedVolume> = Api::namespaced(self.client.clone(), &key.namespace);
        let volumes =
            volumes.list(&ListParams::default()).await.map_err(api_error("listing ReplicatedVolumes".into()))?;
        let events = self.events(key).await?;
        Ok(group_view(&group, &volumes.items, events))
    }

    async fn submit(&self, key: &GroupKey, request: &ActionRequest) -> Result<ActionView, CliError> {
        let group = self.get_group(key).await?;
        let annotation = annotation_for(&request.kind);
        let existing = group.annotations().get(annotation);
        if let Some(value) = existing {
            return Err(CliError::Api {
                status: 409,
                message: format!(
                    "HaGroup {key} already has a pending {annotation} request ({value}); wait for it or remove the annotation"
                ),
            });
        }
        let id = match &request.id {
            Some(id) => id.clone(),
            None => {
                let mut bytes = [0u8; 6];
                rand::rng().fill_bytes(&mut bytes);
                format!("k-{}", crate::support::hex::encode(&bytes))
            }
        };
        let value = annotations::render(&id, &request.kind);
        let version = group.resource_version().unwrap_or_default();
        let path = format!("/metadata/annotations/{}", annotation.replace('~', "~0").replace('/', "~1"));
        let operations = if group.metadata.annotations.is_none() {
            serde_json::json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": version},
                {"op": "add", "path": "/metadata/annotations", "value": {annotation: value}},
            ])
        } else {
            serde_json::json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": version},
                {"op": "add", "path": path, "value": value},
            ])
        };
        let patch: json_patch::Patch =
            serde_json::from_value(operations).map_err(|e| CliError::Decode(format!("building the patch: {e}")))?;
        let api: Api<HaGroup> = Api::namespaced(self.client.clone(), &key.namespace);
        api.patch(&key.name, &PatchParams::default(), &Patch::Json::<()>(patch)).await.map_err(|e| match e {
            kube::Error::Api(status) if status.code == 422 || status.code == 409 => CliError::Api {
                status: 409,
                message: format!("HaGroup {key} changed while the request was written; try again"),
            },
            other => api_error(format!("writing annotation {annotation} on HaGroup {key}"))(other),
        })?;
        self.remember(&id, &request.kind);
        Ok(ActionView {
            id,
            group: key.clone(),
            kind: request.kind.clone(),
            outcome: ActionOutcome::Pending,
            message: format!("annotation {annotation} written; waiting for the operator"),
            submitted: format_millis(now_millis()),
            finished: None,
            results: Vec::new(),
        })
    }

    async fn action(&self, key: &GroupKey, id: &str) -> Result<ActionView, CliError> {
        let group = self.get_group(key).await?;
        let last = group.status.as_ref().and_then(|s| s.last_action.clone());
        let pending =
            annotations::actions_in(group.annotations()).into_iter().filter_map(Result::ok).find(|a| a.id == id);
        match (last, pending) {
            (Some(record), pending) if record.id == id => {
                let kind = pending.map(|p| p.kind).or_else(|| self.recall(id)).ok_or_else(|| {
                    CliError::Config(format!("request {id} on HaGroup {key} was not made by this command"))
                })?;
                Ok(ActionView {
                    id: record.id.clone(),
                    group: key.clone(),
                    kind,
                    outcome: record.outcome,
                    message: record.message.clone(),
                    submitted: record.time.clone(),
                    finished: record.outcome.is_final().then(|| record.time.clone()),
                    results: Vec::new(),
                })
            }
            (_, Some(action)) => Ok(ActionView {
                id: id.to_string(),
                group: key.clone(),
                kind: action.kind,
                outcome: ActionOutcome::Pending,
                message: "waiting for the operator and the agents".into(),
                submitted: String::new(),
                finished: None,
                results: Vec::new(),
            }),
            (_, None) => Err(CliError::Config(format!(
                "request {id} is no longer pending on HaGroup {key} and its outcome is not in status.lastAction (another action replaced it); see `describe {key}`"
            ))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::cli::act;
    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock;

    type Handle = mock::Handle<Request<Body>, Response<Body>>;

    fn group(annotations: Value, status: Value) -> Value {
        json!({
            "apiVersion": "hapair.dev/v1alpha1",
            "kind": "HaGroup",
            "metadata": {"name": "pg", "namespace": "db", "resourceVersion": "42", "annotations": annotations},
            "spec": {"nodes": [
                {"name": "db1", "heartbeatAddresses": ["198.18.1.1"]},
                {"name": "db2", "heartbeatAddresses": ["198.18.1.2"]}
            ]},
            "status": status,
        })
    }

    async fn expect(handle: &mut Handle, method: Method, path: &str, reply: Value) -> Value {
        let (request, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
            .await
            .expect("a request in time")
            .expect("the client is alive");
        assert_eq!((request.method(), request.uri().path()), (&method, path));
        let content_type =
            request.headers().get(http::header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("").to_string());
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        if method == Method::PATCH {
            assert_eq!(content_type.as_deref(), Some("application/json-patch+json"));
        }
        send.send_response(
            Response::builder().status(StatusCode::OK).body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap(),
        );
        body
    }

    const PATH: &str = "/apis/hapair.dev/v1alpha1/namespaces/db/hagroups/pg";

    #[tokio::test]
    async fn status_lists_volumes_whose_deletion_waits_with_the_reason() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let transport = KubeTransport::new(Client::new(service, "db"));
        let cli = tokio::spawn(async move { transport.groups().await });
        let list = |kind: &str, items: Vec<Value>| json!({"apiVersion": "hapair.dev/v1alpha1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items});
        expect(
            &mut handle,
            Method::GET,
            "/apis/hapair.dev/v1alpha1/hagroups",
            list("HaGroupList", vec![group(json!({}), json!({}))]),
        )
        .await;
        let volume = |name: &str, deleting: bool, message: &str| {
            let mut v = json!({
                "apiVersion": "hapair.dev/v1alpha1",
                "kind": "ReplicatedVolume",
                "metadata": {"name": name, "namespace": "db"},
                "spec": {"group": "pg", "size": "1Gi", "backing": [{"node": "db1", "path": "/a"}, {"node": "db2", "path": "/b"}]},
                "status": {"conditions": [{"type": "DeletionBlocked", "status": "True", "reason": "Wiping", "message": message, "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
            });
            if deleting {
                v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            v
        };
        let items = vec![
            volume("old", true, "deletion waits: erasing the replicas; waiting for db2 (no answer yet)"),
            volume("live", false, "stale"),
        ];
        expect(
            &mut handle,
            Method::GET,
            "/apis/hapair.dev/v1alpha1/replicatedvolumes",
            list("ReplicatedVolumeList", items),
        )
        .await;
        let overview = cli.await.unwrap().unwrap();
        assert_eq!(
            overview.deleting_volumes,
            ["db/old: deletion waits: erasing the replicas; waiting for db2 (no answer yet)"]
        );
    }

    #[tokio::test]
    async fn an_action_is_an_annotation_written_by_compare_and_swap_then_read_back_from_the_status() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let transport = KubeTransport::new(Client::new(service, "db"));
        let key = GroupKey::new("db", "pg");
        let cli = async move {
            let mut out = Vec::new();
            let code = act(
                &transport,
                &key,
                AdminActionKind::Switchover { to: "db2".into() },
                Duration::from_secs(30),
                &mut out,
            )
            .await
            .unwrap();
            (code, String::from_utf8(out).unwrap())
        };
        let server = async {
            expect(&mut handle, Method::GET, PATH, group(json!({"other": "x"}), json!({}))).await;
            let patch = expect(&mut handle, Method::PATCH, PATH, group(json!({}), json!({}))).await;
            let value = patch[1]["value"].as_str().unwrap().to_string();
            let id = value.strip_prefix("id=").and_then(|v| v.strip_suffix(",to=db2")).unwrap().to_string();
            assert_eq!(
                patch,
                json!([
                    {"op": "test", "path": "/metadata/resourceVersion", "value": "42"},
                    {"op": "add", "path": "/metadata/annotations/hapair.dev~1switchover", "value": value},
                ])
            );
            // The operator has not answered yet: still pending.
            let pending = json!({hapair_switchover(): value.clone()});
            expect(&mut handle, Method::GET, PATH, group(pending.clone(), json!({}))).await;
            // Then it records the outcome (and removes the annotation).
            let done = json!({"lastAction": {"id": id, "action": "switchover", "outcome": "Succeeded", "message": "db2: serving", "time": "2025-01-01T00:00:00Z"}});
            expect(&mut handle, Method::GET, PATH, group(json!({}), done)).await;
            id
        };
        let ((code, out), id) = tokio::join!(cli, server);
        assert_eq!(code, std::process::ExitCode::SUCCESS);
        assert!(out.contains(&format!("requested as {id}")) && out.contains("db2: serving"), "{out}");
    }

    fn hapair_switchover() -> &'static str {
        annotations::SWITCHOVER
    }

    #[tokio::test]
    async fn a_pending_request_of_the_same_kind_is_not_overwritten() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let transport = KubeTransport::new(Client::new(service, "db"));
        let task = tokio::spawn(async move {
            let request = ActionRequest { id: Some("m2".into()), kind: AdminActionKind::Maintenance { enabled: true } };
            transport.submit(&GroupKey::new("db", "pg"), &request).await.map_err(|e| e.to_string())
        });
        expect(
            &mut handle,
            Method::GET,
            PATH,
            group(json!({annotations::MAINTENANCE: "id=m1,enabled=false"}), json!({})),
        )
        .await;
        let refused = task.await.unwrap();
        assert_eq!(
            refused.err().as_deref(),
            Some(
                "controller answered 409: HaGroup db/pg already has a pending hapair.dev/maintenance request (id=m1,enabled=false); wait for it or remove the annotation"
            )
        );
        // Nothing was written.
        let next = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await;
        assert!(!matches!(next, Ok(Some(_))), "no further request");
    }

    #[test]
    fn objects_become_the_views_status_and_describe_print() {
        let mut with_status: HaGroup = serde_json::from_value(group(json!({}), json!({"phase": "Invalid", "conditions": [
            {"type": "Valid", "status": "False", "reason": "InvalidSpec", "message": "HaGroup db/pg: spec.x: bad", "lastTransitionTime": "2025-01-01T00:00:00Z"}
        ]}))).unwrap();
        with_status.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let view = group_view(&with_status, &[], Vec::new());
        assert_eq!((view.key.to_string(), view.nodes.len(), view.deleting), ("db/pg".to_string(), 2, true));
        assert_eq!(view.error.as_deref(), Some("HaGroup db/pg: spec.x: bad"));
        let event: KubeEvent = serde_json::from_value(json!({
            "metadata": {"name": "pg.1", "namespace": "db"},
            "eventTime": "2025-01-01T00:00:01.000000Z",
            "reportingController": "hapair-operator", "reportingInstance": "op-0",
            "action": "AgentReport", "reason": "Promoted", "type": "Normal", "note": "db2: became primary (epoch 3)"
        }))
        .unwrap();
        let converted = group_event(&event);
        assert_eq!(converted.node.as_deref(), Some("db2"));
        assert_eq!(
            (converted.event.reason.as_str(), converted.event.message.as_str()),
            ("Promoted", "became primary (epoch 3)")
        );
    }
}
