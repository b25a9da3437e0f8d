//! The Kubernetes operator's reconcile against a mocked API server (kube's `tower-test`):
//! every scenario drives the real per-object reconcilers, the shared core and the
//! Kubernetes store, and asserts the exact requests the API server receives, in order,
//! and that nothing else arrives afterwards.
//!
//! The mock answers like an API server would (JSON patches are applied to the stored
//! object, Secrets get resource versions), so the client code sees realistic replies; each
//! request is recorded as one line so the expected sequences read like a log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use hapair_crds::hagroup::NodeRole;
use hapair_crds::nodeapi::{ActionOutcome, EventRecord, EventType, GroupKey, WipeOutcome};
use hapair_crds::{HaGroup, ReplicatedVolume};
use hapair_operator::controller::metrics::Metrics;
use hapair_operator::controller::{Controller, Settings};
use hapair_operator::desired::state::ControllerState;
use hapair_operator::k8s::annotations;
use hapair_operator::k8s::reconciler::{Context, reconcile_group, reconcile_volume};
use hapair_operator::k8s::state_secrets::StateSecrets;
use hapair_operator::k8s::store::{Caches, KubeStore, NamespaceSecrets, SecretCaches};
use hapair_operator::k8s::writer::Writer;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::client::Body;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, store::Writer as CacheWriter};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::watch;
use tower_test::mock::{self, Handle};

use common::{group_report, report, result};

const OPERATOR_NS: &str = "hapair-system";
const QUIET: Duration = Duration::from_millis(400);

const GROUP: &str = r#"
apiVersion: hapair.dev/v1alpha1
kind: HaGroup
metadata: {name: g, namespace: ns, uid: uid-g, generation: 1, resourceVersion: "10"}
spec:
  nodes:
    - {name: a, heartbeatAddresses: [198.18.1.1]}
    - {name: b, heartbeatAddresses: [198.18.1.2]}
  virtualIPs:
    - {name: www, address: 198.18.1.80/24, interface: eth0}
"#;

const GROUP_WITH_VOLUME: &str = r#"
apiVersion: hapair.dev/v1alpha1
kind: HaGroup
metadata: {name: g, namespace: ns, uid: uid-g, generation: 1, resourceVersion: "10"}
spec:
  nodes:
    - {name: a, heartbeatAddresses: [198.18.1.1]}
    - {name: b, heartbeatAddresses: [198.18.1.2]}
  flow:
    - name: data
      volume: {volumeRef: data}
"#;

const VOLUME: &str = r#"
apiVersion: hapair.dev/v1alpha1
kind: ReplicatedVolume
metadata: {name: data, namespace: ns, uid: uid-v, generation: 1, resourceVersion: "11", finalizers: [hapair.dev/cleanup]}
spec:
  group: g
  size: 1Gi
  backing:
    - {node: a, path: /srv/data.img}
    - {node: b, path: /srv/data.img}
"#;

fn parse<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    serde_yaml::from_str(yaml).unwrap()
}

/// GROUP_WITH_VOLUME edited (generation 2) to drop the volume from its flow.
fn group_without_the_volume() -> HaGroup {
    let mut edited: HaGroup = parse(GROUP);
    edited.metadata.generation = Some(2);
    edited.metadata.finalizers = Some(vec!["hapair.dev/cleanup".into()]);
    edited
}

type ApiHandle = Handle<Request<Body>, Response<Body>>;

/// The API server side: objects by URL path, and the requests seen.
struct Server {
    api: ApiHandle,
    objects: BTreeMap<String, Value>,
    version: u64,
}

fn group_path(ns: &str, name: &str) -> String {
    format!("/apis/hapair.dev/v1alpha1/namespaces/{ns}/hagroups/{name}")
}

fn volume_path(ns: &str, name: &str) -> String {
    format!("/apis/hapair.dev/v1alpha1/namespaces/{ns}/replicatedvolumes/{name}")
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

/// One-line summary of a status condition list: `Type=Status` for the interesting ones.
fn conditions(status: &Value) -> String {
    let mut out = Vec::new();
    for c in status["conditions"].as_array().into_iter().flatten() {
        let t = c["type"].as_str().unwrap_or("");
        if ["Valid", "Ready", "DeletionBlocked"].contains(&t) {
            out.push(format!("{t}={}", c["status"].as_str().unwrap_or("")));
        }
    }
    out.join(",")
}

fn state_summary(secret: &Value) -> String {
    let encoded = secret["data"]["state.json"].as_str().unwrap_or("");
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
    let state: ControllerState = serde_json::from_slice(&bytes).unwrap();
    let keys = |m: Vec<String>| if m.is_empty() { "-".to_string() } else { m.join(",") };
    let summary = format!(
        "running={} deleting={} keys={} actions={}",
        keys(state.last_good.keys().map(|k| k.to_string()).collect()),
        keys(state.deleting.keys().map(|k| k.to_string()).collect()),
        keys(state.generated_keys.keys().map(|k| k.to_string()).collect()),
        keys(state.actions.values().map(|a| format!("{}:{:?}", a.action.id, a.outcome)).collect()),
    );
    if state.wiping.is_empty() {
        return summary;
    }
    let wiping = state.wiping.iter().map(|(k, w)| format!("{k}({})", w.pending().join(","))).collect::<Vec<_>>();
    format!("{summary} wiping={}", wiping.join(","))
}

impl Server {
    /// Answers one request as an API server would; returns its summary line.
    async fn serve_one(&mut self, wait: Duration) -> Option<String> {
        let (request, send) = tokio::time::timeout(wait, self.api.next_request()).await.ok()??;
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().unwrap_or("").to_string();
        let content_type =
            parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let short = path.trim_start_matches("/apis/hapair.dev/v1alpha1/namespaces/").to_string();
        let (code, reply, line) = match parts.method {
            Method::GET => match self.objects.get(&path) {
                Some(object) => {
                    (StatusCode::OK, object.clone(), format!("GET {}", path.rsplit('/').next().unwrap_or("")))
                }
                None => (
                    StatusCode::NOT_FOUND,
                    not_found(),
                    format!("GET {} (absent)", path.rsplit('/').next().unwrap_or("")),
                ),
            },
            Method::POST if path.ends_with("/secrets") => {
                let mut secret = body.clone();
                self.version += 1;
                secret["metadata"]["resourceVersion"] = json!(self.version.to_string());
                let name = secret["metadata"]["name"].as_str().unwrap_or("").to_string();
                self.objects.insert(format!("{path}/{name}"), secret.clone());
                (StatusCode::CREATED, secret, format!("CREATE secret {name}: {}", state_summary(&body)))
            }
            Method::PUT if path.contains("/secrets/") => {
                let stored =
                    self.objects.get(&path).and_then(|o| o["metadata"]["resourceVersion"].as_str().map(String::from));
                assert_eq!(body["metadata"]["resourceVersion"].as_str().map(String::from), stored, "compare-and-swap");
                let mut secret = body.clone();
                self.version += 1;
                secret["metadata"]["resourceVersion"] = json!(self.version.to_string());
                self.objects.insert(path.clone(), secret.clone());
                let name = path.rsplit('/').next().unwrap_or("").to_string();
                (StatusCode::OK, secret, format!("UPDATE secret {name}: {}", state_summary(&body)))
            }
            Method::POST if path.ends_with("/events") => {
                let note = body["note"].as_str().unwrap_or("");
                let regarding = format!(
                    "{}/{}",
                    body["regarding"]["namespace"].as_str().unwrap_or(""),
                    body["regarding"]["name"].as_str().unwrap_or("")
                );
                assert_eq!(body["reportingController"], json!("hapair-operator"));
                let kind = match body["regarding"]["kind"].as_str() {
                    Some("HaGroup") => "",
                    Some("ReplicatedVolume") => "volume ",
                    other => panic!("an Event regarding {other:?}"),
                };
                let line = format!(
                    "EVENT {kind}{regarding} {} {}: {note}",
                    body["type"].as_str().unwrap_or(""),
                    body["reason"].as_str().unwrap_or("")
                );
                (StatusCode::CREATED, body, line)
            }
            Method::PATCH if path.ends_with("/status") => {
                assert_eq!(content_type, "application/apply-patch+yaml", "server-side apply");
                assert!(query.contains("fieldManager=hapair-operator") && query.contains("force=true"), "{query}");
                let object_path = path.trim_end_matches("/status").to_string();
                let status = body["status"].clone();
                let object = self.objects.entry(object_path).or_insert_with(|| json!({}));
                object["status"] = status.clone();
                let line = if path.contains("/hagroups/") {
                    let last = &status["lastAction"];
                    format!(
                        "APPLY {short} phase={} active={} gen={} {} lastAction={}",
                        status["phase"].as_str().unwrap_or("-"),
                        status["activeNode"].as_str().unwrap_or("-"),
                        status["observedGeneration"],
                        conditions(&status),
                        if last.is_null() {
                            "-".to_string()
                        } else {
                            format!("{}:{}", last["id"].as_str().unwrap_or(""), last["outcome"].as_str().unwrap_or(""))
                        }
                    )
                } else {
                    format!(
                        "APPLY {short} sync={} {}",
                        status["syncState"].as_str().unwrap_or("-"),
                        conditions(&status)
                    )
                };
                (StatusCode::OK, object.clone(), line)
            }
            Method::PATCH => {
                assert_eq!(content_type, "application/json-patch+json");
                let object = self.objects.get_mut(&path).expect("patching a known object");
                // Like the API server, a test for null passes on a path that does not exist.
                let operations: Vec<Value> = body
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|op| {
                        let missing = op["path"].as_str().is_some_and(|p| object.pointer(p).is_none());
                        !(op["op"] == json!("test") && op["value"].is_null() && missing)
                    })
                    .cloned()
                    .collect();
                let patch: json_patch::Patch = serde_json::from_value(Value::Array(operations)).unwrap();
                let applied = json_patch::patch(object, &patch);
                let ops: Vec<String> = body
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|op| op["op"] != json!("test"))
                    .map(|op| format!("{} {}", op["op"].as_str().unwrap_or(""), op["path"].as_str().unwrap_or("")))
                    .collect();
                match applied {
                    Ok(()) => (StatusCode::OK, object.clone(), format!("PATCH {short} {}", ops.join("; "))),
                    Err(e) => (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 422, "message": e.to_string()}),
                        format!("PATCH {short} {} (refused: {e})", ops.join("; ")),
                    ),
                }
            }
            other => panic!("unexpected request {other} {path}"),
        };
        let response = Response::builder().status(code).body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap();
        send.send_response(response);
        Some(line)
    }

    /// Answers requests until none comes for a while; returns their summaries in order.
    async fn collect(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Some(line) = self.serve_one(QUIET).await {
            lines.push(line);
        }
        lines
    }
}

struct Harness {
    server: Server,
    groups: CacheWriter<HaGroup>,
    volumes: CacheWriter<ReplicatedVolume>,
    _secrets: CacheWriter<PartialObjectMeta<Secret>>,
    ctx: Arc<Context>,
    core: Arc<Controller<KubeStore>>,
    _core_tx: watch::Sender<Option<Arc<Controller<KubeStore>>>>,
}

impl Harness {
    async fn start() -> Harness {
        let (service, api) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let metrics = Arc::new(Metrics::new());
        let (groups_cache, mut groups) = reflector::store::<HaGroup>();
        let (volumes_cache, mut volumes) = reflector::store::<ReplicatedVolume>();
        let (secrets_cache, mut secrets) = reflector::store::<PartialObjectMeta<Secret>>();
        groups.apply_watcher_event(&watcher::Event::InitDone);
        volumes.apply_watcher_event(&watcher::Event::InitDone);
        secrets.apply_watcher_event(&watcher::Event::InitDone);
        let mut secret_caches = SecretCaches::default();
        secret_caches.insert(OPERATOR_NS, NamespaceSecrets { cache: secrets_cache, denied: Default::default() });
        let caches = Caches {
            groups: groups_cache,
            volumes: volumes_cache,
            secrets: secret_caches,
            synced: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        };
        let state =
            StateSecrets::with_shards(Api::namespaced(client.clone(), OPERATOR_NS), "hapair-state", 1, metrics.clone());
        let writer = Writer::start(
            client.clone(),
            caches.groups.clone(),
            caches.volumes.clone(),
            "operator-0",
            1,
            metrics.clone(),
        );
        let store = KubeStore::new(client.clone(), caches, state, writer, metrics.clone());
        let settings = Settings { startup_grace: Duration::ZERO, ..Settings::default() };
        let starting = tokio::spawn({
            let metrics = metrics.clone();
            async move { Controller::start(store, settings, metrics).await }
        });
        let mut server = Server { api, objects: BTreeMap::new(), version: 100 };
        // Starting reads the state; nothing exists yet, and an empty world writes nothing.
        assert_eq!(server.collect().await, ["GET hapair-state-0 (absent)"]);
        let core = Arc::new(starting.await.unwrap().unwrap());
        let (core_tx, core_rx) = watch::channel(Some(core.clone()));
        let ctx = Arc::new(Context::new(client, core_rx, metrics));
        Harness { server, groups, volumes, _secrets: secrets, ctx, core, _core_tx: core_tx }
    }

    /// Stores `group` on the "API server" and in the operator's cache, as a watch would.
    fn put_group(&mut self, group: &HaGroup) {
        let key =
            (group.metadata.namespace.clone().unwrap_or_default(), group.metadata.name.clone().unwrap_or_default());
        let mut stored = serde_json::to_value(group).unwrap();
        if let Some(existing) = self.server.objects.get(&group_path(&key.0, &key.1))
            && stored["status"].is_null()
        {
            stored["status"] = existing["status"].clone();
        }
        self.server.objects.insert(group_path(&key.0, &key.1), stored.clone());
        self.groups.apply_watcher_event(&watcher::Event::Apply(serde_json::from_value(stored).unwrap()));
    }

    fn put_volume(&mut self, volume: &ReplicatedVolume) {
        let (ns, name) =
            (volume.metadata.namespace.clone().unwrap_or_default(), volume.metadata.name.clone().unwrap_or_default());
        self.server.objects.insert(volume_path(&ns, &name), serde_json::to_value(volume).unwrap());
        self.volumes.apply_watcher_event(&watcher::Event::Apply(volume.clone()));
    }

    /// The group as the API server has it now (after the operator's patches), pushed into
    /// the cache like the watch echo of those patches.
    fn echo_group(&mut self, ns: &str, name: &str) -> HaGroup {
        let group: HaGroup = serde_json::from_value(self.server.objects[&group_path(ns, name)].clone()).unwrap();
        self.groups.apply_watcher_event(&watcher::Event::Apply(group.clone()));
        group
    }

    /// Reconciles `group`, answering the API requests it causes; returns their summaries.
    async fn reconcile(&mut self, group: HaGroup) -> (Action, Vec<String>) {
        let task = tokio::spawn(reconcile_group(Arc::new(group), self.ctx.clone()));
        let lines = self.server.collect().await;
        let action = task.await.unwrap().unwrap_or_else(|e| panic!("reconcile failed: {e}; requests: {lines:#?}"));
        (action, lines)
    }

    async fn reconcile_volume(&mut self, volume: ReplicatedVolume) -> (Action, Vec<String>) {
        let task = tokio::spawn(reconcile_volume(Arc::new(volume), self.ctx.clone()));
        let lines = self.server.collect().await;
        let action = task.await.unwrap().unwrap_or_else(|e| panic!("reconcile failed: {e}; requests: {lines:#?}"));
        (action, lines)
    }

    /// Posts an agent report to the core, answering the requests it causes.
    async fn report(&mut self, node: &str, report: hapair_crds::nodeapi::NodeReport) -> Vec<String> {
        let core = self.core.clone();
        let node = node.to_string();
        let task =
            tokio::spawn(
                async move { core.accept_report(&node, report, hapair_crds::nodeapi::NODE_API_VERSION).await },
            );
        let lines = self.server.collect().await;
        task.await.unwrap().unwrap();
        lines
    }

    /// A valid group created and reconciled once: finalizer, state, status.
    async fn running(yaml: &str) -> Harness {
        let mut h = Harness::start().await;
        let group: HaGroup = parse(yaml);
        h.put_group(&group);
        let (_, lines) = h.reconcile(group).await;
        assert_eq!(lines.len(), 3, "{lines:#?}");
        h.echo_group("ns", "g");
        h
    }
}

fn key() -> GroupKey {
    GroupKey::new("ns", "g")
}

#[tokio::test]
async fn create_adds_the_finalizer_then_records_state_then_applies_the_status() {
    let mut h = Harness::start().await;
    let group: HaGroup = parse(GROUP);
    h.put_group(&group);
    let (action, lines) = h.reconcile(group).await;
    assert_eq!(
        lines,
        [
            "PATCH ns/hagroups/g add /metadata/finalizers",
            "CREATE secret hapair-state-0: running=ns/g deleting=- keys=ns/g actions=-",
            "APPLY ns/hagroups/g/status phase=Pending active=- gen=1 Valid=True,Ready=Unknown lastAction=-",
        ]
    );
    assert_eq!(action, Action::await_change());
    // The nodes got their bundles.
    let bundle = h.core.current_config("a").expect("a bundle for a");
    assert_eq!((bundle.revision, bundle.groups.len()), (1, 1));
    // The watch echo of the operator's own writes changes nothing.
    let echoed = h.echo_group("ns", "g");
    assert_eq!(echoed.metadata.finalizers.as_deref(), Some(&["hapair.dev/cleanup".to_string()][..]));
    let (_, lines) = h.reconcile(echoed).await;
    assert!(lines.is_empty(), "{lines:#?}");
}

#[tokio::test]
async fn an_invalid_spec_is_reported_once_and_then_nothing_is_written() {
    let mut h = Harness::start().await;
    let group: HaGroup = parse(&GROUP.replace("  virtualIPs:", "  heartbeat: {leaseTTL: 5s}\n  virtualIPs:"));
    h.put_group(&group);
    let (action, lines) = h.reconcile(group).await;
    let why = "HaGroup ns/g: spec.heartbeat.leaseTTL: leaseTTL (5s) must be less than deadAfter (1s): the primary must lose its lease before the standby may take over";
    assert_eq!(
        lines,
        [
            "PATCH ns/hagroups/g add /metadata/finalizers".to_string(),
            format!("EVENT ns/g Warning InvalidManifest: {why}"),
            "APPLY ns/hagroups/g/status phase=Invalid active=- gen=1 Valid=False,Ready=Unknown lastAction=-"
                .to_string(),
        ]
    );
    // It waits for a change rather than retrying.
    assert_eq!(action, Action::await_change());
    let status = &h.server.objects[&group_path("ns", "g")]["status"];
    let valid = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Valid").unwrap();
    assert_eq!(valid["message"], json!(why), "the message names the field");
    assert!(h.core.current_config("a").is_none(), "nothing runs for a group never valid");
    // No hot loop: the echo, a full reconcile and a periodic tick write nothing.
    let echoed = h.echo_group("ns", "g");
    let (_, lines) = h.reconcile(echoed).await;
    assert!(lines.is_empty(), "{lines:#?}");
    let core = h.core.clone();
    let full = tokio::spawn(async move {
        core.reconcile().await.unwrap();
        core.tick().await.unwrap();
    });
    assert!(h.server.collect().await.is_empty());
    full.await.unwrap();
}

#[tokio::test]
async fn an_invalid_edit_leaves_the_running_group_alone() {
    let mut h = Harness::running(GROUP).await;
    let before = h.core.current_config("a").unwrap();
    let mut edited: HaGroup = parse(&GROUP.replace("  virtualIPs:", "  heartbeat: {leaseTTL: 5s}\n  virtualIPs:"));
    edited.metadata.generation = Some(2);
    edited.metadata.finalizers = Some(vec!["hapair.dev/cleanup".into()]);
    h.put_group(&edited);
    let (_, lines) = h.reconcile(edited).await;
    assert_eq!(
        lines,
        [
            "EVENT ns/g Warning InvalidManifest: HaGroup ns/g: spec.heartbeat.leaseTTL: leaseTTL (5s) must be less than deadAfter (1s): the primary must lose its lease before the standby may take over; the last good config stays in force",
            "APPLY ns/hagroups/g/status phase=Invalid active=- gen=2 Valid=False,Ready=Unknown lastAction=-",
        ]
    );
    assert_eq!(h.core.current_config("a"), Some(before), "same bundle, same revision");
}

#[tokio::test]
async fn agent_reports_update_the_status_and_an_unchanged_report_writes_nothing() {
    let mut h = Harness::running(GROUP).await;
    let mut primary = group_report(&key(), NodeRole::Primary, 1);
    primary.events.push(EventRecord {
        time: "2025-01-01T00:00:00Z".into(),
        type_: EventType::Normal,
        reason: "Promoted".into(),
        message: "became primary: peer lost on every link, witness granted".into(),
        epoch: 1,
    });
    let lines = h.report("a", report("a", 1, vec![primary.clone()])).await;
    assert_eq!(
        lines,
        [
            "EVENT ns/g Normal Promoted: a: became primary: peer lost on every link, witness granted (epoch 1)",
            "APPLY ns/hagroups/g/status phase=Degraded active=a gen=1 Valid=True,Ready=True lastAction=-",
            "EVENT ns/g Warning PhaseChanged: Pending -> Degraded (b: no report)",
        ]
    );
    let lines = h.report("b", report("b", 1, vec![group_report(&key(), NodeRole::Standby, 1)])).await;
    assert_eq!(
        lines,
        [
            "APPLY ns/hagroups/g/status phase=Healthy active=a gen=1 Valid=True,Ready=True lastAction=-",
            "EVENT ns/g Normal PhaseChanged: Degraded -> Healthy",
        ]
    );
    // The same state again, only later and with other telemetry: no write at all.
    primary.events.clear();
    let mut again = report("a", 1, vec![primary]);
    again.uptime_seconds = 500;
    again.hardware.cpu_percent = 73;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(h.report("a", again).await.is_empty());
    assert!(h.report("b", report("b", 1, vec![group_report(&key(), NodeRole::Standby, 1)])).await.is_empty());
}

#[tokio::test]
async fn a_switchover_annotation_is_delivered_recorded_and_removed() {
    let mut h = Harness::running(GROUP).await;
    h.report("a", report("a", 1, vec![group_report(&key(), NodeRole::Primary, 1)])).await;
    h.report("b", report("b", 1, vec![group_report(&key(), NodeRole::Standby, 1)])).await;
    let mut annotated = h.echo_group("ns", "g");
    annotated.metadata.annotations = Some([(annotations::SWITCHOVER.to_string(), "id=s1,to=b".to_string())].into());
    h.put_group(&annotated);
    let (action, lines) = h.reconcile(annotated).await;
    assert_eq!(
        lines,
        [
            "UPDATE secret hapair-state-0: running=ns/g deleting=- keys=ns/g actions=s1:Pending",
            "EVENT ns/g Normal ActionRequested: switchover s1 requested by the HaGroup annotation: move the service to b",
            "APPLY ns/hagroups/g/status phase=Healthy active=a gen=1 Valid=True,Ready=True lastAction=s1:Pending",
        ]
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(1)), "looked at again until it finishes");
    // Delivered: both nodes' bundles carry it.
    for node in ["a", "b"] {
        let bundle = h.core.current_config(node).unwrap();
        assert_eq!(bundle.groups[0].actions.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["s1"], "{node}");
    }
    // While it runs, looking again changes nothing.
    let echoed = h.echo_group("ns", "g");
    let (_, lines) = h.reconcile(echoed).await;
    assert!(lines.is_empty(), "{lines:#?}");
    // The agents carry it out and say so.
    let mut demoted = group_report(&key(), NodeRole::Standby, 1);
    demoted.actions.push(result("s1", ActionOutcome::Succeeded, "demoted"));
    let lines = h.report("a", report("a", 2, vec![demoted])).await;
    assert_eq!(
        lines,
        [
            "UPDATE secret hapair-state-0: running=ns/g deleting=- keys=ns/g actions=s1:Pending",
            "APPLY ns/hagroups/g/status phase=Down active=- gen=1 Valid=True,Ready=False lastAction=s1:Pending",
            "EVENT ns/g Warning PhaseChanged: Healthy -> Down (no node is active)",
        ]
    );
    let mut promoted = group_report(&key(), NodeRole::Primary, 2);
    promoted.actions.push(result("s1", ActionOutcome::Succeeded, "serving"));
    let lines = h.report("b", report("b", 2, vec![promoted])).await;
    assert_eq!(
        lines,
        [
            "UPDATE secret hapair-state-0: running=ns/g deleting=- keys=ns/g actions=s1:Succeeded",
            "EVENT ns/g Normal ActionSucceeded: switchover s1: b: serving",
            "APPLY ns/hagroups/g/status phase=Healthy active=b gen=1 Valid=True,Ready=True lastAction=s1:Succeeded",
            "EVENT ns/g Normal PhaseChanged: Down -> Healthy",
        ]
    );
    // The outcome is in the status as the API server has it: the annotation goes.
    let echoed = h.echo_group("ns", "g");
    let (action, lines) = h.reconcile(echoed).await;
    assert_eq!(lines, ["PATCH ns/hagroups/g remove /metadata/annotations/hapair.dev~1switchover"]);
    assert_eq!(action, Action::await_change());
    let stored = &h.server.objects[&group_path("ns", "g")];
    assert_eq!(stored["metadata"]["annotations"], json!({}));
    assert_eq!(stored["status"]["lastAction"]["message"], json!("b: serving"));
}

#[tokio::test]
async fn a_refused_annotation_is_recorded_as_rejected_and_removed() {
    let mut h = Harness::running(GROUP).await;
    let mut annotated = h.echo_group("ns", "g");
    annotated.metadata.annotations = Some([(annotations::FORCE_ACTIVE.to_string(), "id=f1,node=c".to_string())].into());
    h.put_group(&annotated);
    let (action, lines) = h.reconcile(annotated).await;
    assert_eq!(
        lines,
        [
            "UPDATE secret hapair-state-0: running=ns/g deleting=- keys=ns/g actions=f1:Rejected",
            "EVENT ns/g Warning ActionRejected: force-active f1 refused: node: \"c\" is not a node of HaGroup ns/g (nodes: a, b)",
            "APPLY ns/hagroups/g/status phase=Pending active=- gen=1 Valid=True,Ready=Unknown lastAction=f1:Rejected",
        ]
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(1)));
    let echoed = h.echo_group("ns", "g");
    let (_, lines) = h.reconcile(echoed).await;
    assert_eq!(lines, ["PATCH ns/hagroups/g remove /metadata/annotations/hapair.dev~1force-active"]);
}

#[tokio::test]
async fn delete_cleans_up_on_both_nodes_then_removes_the_finalizer() {
    let mut h = Harness::running(GROUP).await;
    let mut deleting = h.echo_group("ns", "g");
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    h.put_group(&deleting);
    let (action, lines) = h.reconcile(deleting.clone()).await;
    assert_eq!(
        lines,
        [
            "UPDATE secret hapair-state-0: running=- deleting=ns/g keys=ns/g actions=-",
            "EVENT ns/g Normal Deleting: removed from the desired state; waiting for both nodes to clean up",
            "APPLY ns/hagroups/g/status phase=Pending active=- gen=1 Valid=True,Ready=False lastAction=-",
        ]
    );
    assert_eq!(action, Action::await_change());
    assert!(h.core.current_config("a").unwrap().groups[0].deleting, "the nodes are told to clean up");
    let mut done = group_report(&key(), NodeRole::Standby, 1);
    done.cleaned_up = true;
    let lines = h.report("a", report("a", 2, vec![done.clone()])).await;
    assert_eq!(
        lines,
        [
            "UPDATE secret hapair-state-0: running=- deleting=ns/g keys=ns/g actions=-",
            "APPLY ns/hagroups/g/status phase=Down active=- gen=1 Valid=True,Ready=False lastAction=-",
            "EVENT ns/g Warning PhaseChanged: Pending -> Down (being removed)",
        ]
    );
    let lines = h.report("b", report("b", 2, vec![done])).await;
    assert_eq!(
        lines,
        [
            "UPDATE secret hapair-state-0: running=- deleting=- keys=- actions=-",
            "GET g",
            "PATCH ns/hagroups/g remove /metadata/finalizers/0",
        ]
    );
    assert!(h.core.current_config("a").unwrap().groups.is_empty());
}

#[tokio::test]
async fn deleting_a_group_that_never_ran_lets_it_go_at_once() {
    let mut h = Harness::start().await;
    let mut group: HaGroup = parse(&GROUP.replace("  virtualIPs:", "  heartbeat: {leaseTTL: 5s}\n  virtualIPs:"));
    group.metadata.finalizers = Some(vec!["hapair.dev/cleanup".into()]);
    group.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    h.put_group(&group);
    let (_, lines) = h.reconcile(group).await;
    assert_eq!(lines, ["PATCH ns/hagroups/g remove /metadata/finalizers/0"]);
}

#[tokio::test]
async fn deleting_a_volume_in_use_is_blocked_with_a_condition_until_the_group_drops_it() {
    let mut h = Harness::start().await;
    let volume: ReplicatedVolume = parse(VOLUME);
    h.put_volume(&volume);
    let group: HaGroup = parse(GROUP_WITH_VOLUME);
    h.put_group(&group);
    let (_, lines) = h.reconcile(group).await;
    assert_eq!(
        lines,
        [
            "PATCH ns/hagroups/g add /metadata/finalizers",
            "CREATE secret hapair-state-0: running=ns/g deleting=- keys=ns/g actions=-",
            "APPLY ns/hagroups/g/status phase=Pending active=- gen=1 Valid=True,Ready=Unknown lastAction=-",
            "APPLY ns/replicatedvolumes/data/status sync=Unknown Valid=True",
        ]
    );
    h.echo_group("ns", "g");
    let mut deleting = volume.clone();
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    h.put_volume(&deleting);
    let (action, lines) = h.reconcile_volume(deleting.clone()).await;
    assert_eq!(lines, ["APPLY ns/replicatedvolumes/data/status sync=Unknown Valid=True,DeletionBlocked=True"]);
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    let status = &h.server.objects[&volume_path("ns", "data")]["status"];
    let blocked = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "DeletionBlocked").unwrap();
    assert_eq!(
        blocked["message"],
        json!("deletion waits: used by HaGroup ns/g; remove it from their flow and monitors (or delete them) first")
    );
    // Still blocked: looking again writes nothing new.
    let (_, lines) = h.reconcile_volume(deleting.clone()).await;
    assert!(lines.is_empty(), "{lines:#?}");
    // The group drops the volume from its flow; then the volume may go.
    let edited = group_without_the_volume();
    h.put_group(&edited);
    let (_, lines) = h.reconcile(edited).await;
    assert_eq!(
        lines,
        [
            "UPDATE secret hapair-state-0: running=ns/g deleting=- keys=ns/g actions=-",
            "APPLY ns/hagroups/g/status phase=Pending active=- gen=2 Valid=True,Ready=Unknown lastAction=-",
        ]
    );
    let (action, lines) = h.reconcile_volume(deleting).await;
    assert_eq!(lines, ["PATCH ns/replicatedvolumes/data remove /metadata/finalizers/0"]);
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn deleting_a_volume_with_wipe_waits_for_both_nodes_to_erase_it_then_removes_the_finalizer() {
    let mut h = Harness::start().await;
    let volume: ReplicatedVolume = parse(&VOLUME.replace("  size: 1Gi\n", "  size: 1Gi\n  deletionPolicy: Wipe\n"));
    h.put_volume(&volume);
    let group: HaGroup = parse(GROUP_WITH_VOLUME);
    h.put_group(&group);
    let (_, lines) = h.reconcile(group).await;
    assert_eq!(lines.len(), 4, "{lines:#?}");
    h.echo_group("ns", "g");
    let uuid = h.core.current_config("a").unwrap().groups[0].volumes[0].uuid.clone();

    // Deleted while the group uses it: blocked, and nothing goes to the nodes.
    let mut deleting = volume.clone();
    deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    h.put_volume(&deleting);
    let (_, lines) = h.reconcile_volume(deleting.clone()).await;
    assert_eq!(lines, ["APPLY ns/replicatedvolumes/data/status sync=Unknown Valid=True,DeletionBlocked=True"]);
    assert!(h.core.current_config("a").unwrap().wipes.is_empty());

    // The group lets go of it: the wipe starts and goes out to both nodes.
    let edited = group_without_the_volume();
    h.put_group(&edited);
    let (_, lines) = h.reconcile(edited).await;
    assert_eq!(
        lines,
        [
            "UPDATE secret hapair-state-0: running=ns/g deleting=- keys=ns/g actions=- wiping=ns/data(a,b)",
            "EVENT volume ns/data Normal Wiping: volume deleted with deletionPolicy: Wipe; erasing its replicas on a, b",
            "APPLY ns/hagroups/g/status phase=Pending active=- gen=2 Valid=True,Ready=Unknown lastAction=-",
        ]
    );
    for node in ["a", "b"] {
        let wipes = h.core.current_config(node).unwrap().wipes.clone();
        assert_eq!(wipes.len(), 1, "{node}");
        assert_eq!((wipes[0].volume.to_string(), wipes[0].uuid.as_str()), ("ns/data".to_string(), uuid.as_str()));
    }
    assert_eq!(
        h.core.overview().await.deleting_volumes,
        ["ns/data: erasing the replicas (deletionPolicy: Wipe); waiting for a (no answer yet); b (no answer yet)"]
    );
    let (action, lines) = h.reconcile_volume(deleting.clone()).await;
    assert_eq!(lines, ["APPLY ns/replicatedvolumes/data/status sync=Unknown Valid=True,DeletionBlocked=True"]);
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    let status = &h.server.objects[&volume_path("ns", "data")]["status"];
    let blocked = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "DeletionBlocked").unwrap();
    assert_eq!(blocked["reason"], json!("Wiping"));
    assert_eq!(
        blocked["message"],
        json!(
            "deletion waits: erasing the replicas (deletionPolicy: Wipe); waiting for a (no answer yet); b (no answer yet)"
        )
    );

    // a is still waiting for its replica to close, then wipes; b had nothing there.
    let answer = |outcome, message: &str| hapair_crds::nodeapi::WipeReport {
        volume: GroupKey::new("ns", "data"),
        uuid: uuid.clone(),
        outcome,
        message: message.into(),
    };
    let mut waiting = report("a", 3, vec![]);
    waiting.wipes = vec![answer(WipeOutcome::Waiting, "/srv/data.img is open by a replica (lock held)")];
    let lines = h.report("a", waiting).await;
    assert_eq!(lines, ["EVENT volume ns/data Normal WipeWaiting: a: /srv/data.img is open by a replica (lock held)"]);
    let mut wiped = report("a", 3, vec![]);
    wiped.wipes = vec![answer(WipeOutcome::Wiped, "discarded 1073741824 bytes of data in /srv/data.img")];
    let lines = h.report("a", wiped.clone()).await;
    assert_eq!(
        lines,
        [
            "UPDATE secret hapair-state-0: running=ns/g deleting=- keys=ns/g actions=- wiping=ns/data(b)",
            "EVENT volume ns/data Normal VolumeWiped: a: discarded 1073741824 bytes of data in /srv/data.img",
            // The first full status pass since a reported at all.
            "APPLY ns/hagroups/g/status phase=Pending active=- gen=2 Valid=True,Ready=Unknown lastAction=-",
        ]
    );
    assert!(h.core.current_config("a").unwrap().wipes.is_empty(), "a answered: its bundle drops the wipe");
    // The same answer again is no news.
    assert!(h.report("a", wiped).await.is_empty());
    let (_, lines) = h.reconcile_volume(deleting.clone()).await;
    assert_eq!(lines, ["APPLY ns/replicatedvolumes/data/status sync=Unknown Valid=True,DeletionBlocked=True"]);

    let mut nothing = report("b", 3, vec![]);
    nothing.wipes = vec![answer(WipeOutcome::NothingToWipe, "/srv/data.img does not exist")];
    let lines = h.report("b", nothing).await;
    assert_eq!(
        lines,
        [
            "UPDATE secret hapair-state-0: running=ns/g deleting=- keys=ns/g actions=-",
            "EVENT volume ns/data Normal NothingToWipe: b: /srv/data.img does not exist",
            "EVENT volume ns/data Normal Wiped: every replica answered (a: Wiped, b: NothingToWipe); the volume is gone",
            "APPLY ns/hagroups/g/status phase=Pending active=- gen=2 Valid=True,Ready=Unknown lastAction=-",
        ]
    );
    assert!(h.core.overview().await.deleting_volumes.is_empty());
    let (action, lines) = h.reconcile_volume(deleting).await;
    assert_eq!(lines, ["PATCH ns/replicatedvolumes/data remove /metadata/finalizers/0"]);
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_cache_behind_the_finalizer_patch_does_not_add_it_twice() {
    let mut h = Harness::start().await;
    let stale: HaGroup = parse(GROUP);
    // The API server already has the operator's finalizer (an earlier reconcile added it);
    // the watch event the reconcile runs on predates that patch.
    let mut current = stale.clone();
    current.metadata.finalizers = Some(vec!["hapair.dev/cleanup".into()]);
    h.put_group(&current);
    let (action, lines) = h.reconcile(stale).await;
    assert_eq!(lines.len(), 4, "{lines:#?}");
    assert!(lines[0].starts_with("PATCH ns/hagroups/g add /metadata/finalizers (refused:"), "{lines:#?}");
    assert_eq!(
        lines[1..],
        [
            "GET g",
            "CREATE secret hapair-state-0: running=ns/g deleting=- keys=ns/g actions=-",
            "APPLY ns/hagroups/g/status phase=Pending active=- gen=1 Valid=True,Ready=Unknown lastAction=-",
        ]
    );
    assert_eq!(action, Action::await_change());
    let stored = &h.server.objects[&group_path("ns", "g")];
    assert_eq!(stored["metadata"]["finalizers"], json!(["hapair.dev/cleanup"]), "one finalizer, not two");
}

#[tokio::test]
async fn a_finalizer_list_changed_by_someone_else_is_read_again_and_extended() {
    let mut h = Harness::start().await;
    let stale: HaGroup = parse(GROUP);
    // Another controller added its own finalizer after the cached copy was taken.
    let mut current = stale.clone();
    current.metadata.finalizers = Some(vec!["example.com/other".into()]);
    h.put_group(&current);
    let (_, lines) = h.reconcile(stale).await;
    assert!(lines[0].contains("(refused:"), "{lines:#?}");
    assert_eq!(lines[1..3], ["GET g", "PATCH ns/hagroups/g add /metadata/finalizers/-"]);
    let stored = &h.server.objects[&group_path("ns", "g")];
    assert_eq!(stored["metadata"]["finalizers"], json!(["example.com/other", "hapair.dev/cleanup"]));
}

#[tokio::test]
async fn a_volume_of_a_missing_group_is_refused_with_a_warning_until_the_group_exists() {
    let mut h = Harness::start().await;
    let volume: ReplicatedVolume = parse(VOLUME);
    h.put_volume(&volume);
    let (action, lines) = h.reconcile_volume(volume.clone()).await;
    let why = "ReplicatedVolume ns/data: spec.group: no HaGroup named \"g\" in the volume's namespace";
    assert_eq!(
        lines,
        [
            format!("EVENT volume ns/data Warning InvalidManifest: {why}"),
            "APPLY ns/replicatedvolumes/data/status sync=- Valid=False".to_string(),
        ]
    );
    assert_eq!(action, Action::await_change());
    let status = &h.server.objects[&volume_path("ns", "data")]["status"];
    let valid = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Valid").unwrap();
    assert_eq!(valid["message"], json!(why), "the message names the field");
    assert_eq!(status["observedGeneration"], json!(1));
    // No hot loop: looking again, and a full reconcile, write nothing.
    let (_, lines) = h.reconcile_volume(volume).await;
    assert!(lines.is_empty(), "{lines:#?}");
    let core = h.core.clone();
    let full = tokio::spawn(async move { core.reconcile().await.unwrap() });
    assert!(h.server.collect().await.is_empty());
    full.await.unwrap();
    // The group appears: the volume is taken, and says so.
    let group: HaGroup = parse(GROUP_WITH_VOLUME);
    h.put_group(&group);
    let (_, lines) = h.reconcile(group).await;
    assert_eq!(
        lines,
        [
            "PATCH ns/hagroups/g add /metadata/finalizers",
            "CREATE secret hapair-state-0: running=ns/g deleting=- keys=ns/g actions=-",
            "APPLY ns/hagroups/g/status phase=Pending active=- gen=1 Valid=True,Ready=Unknown lastAction=-",
            "APPLY ns/replicatedvolumes/data/status sync=Unknown Valid=True",
        ]
    );
}

#[tokio::test]
async fn a_volume_on_foreign_nodes_refuses_it_and_the_group_that_uses_it() {
    let mut h = Harness::start().await;
    let volume: ReplicatedVolume = parse(&VOLUME.replace("{node: b,", "{node: c,"));
    h.put_volume(&volume);
    let group: HaGroup = parse(GROUP_WITH_VOLUME);
    h.put_group(&group);
    let (_, lines) = h.reconcile(group).await;
    assert_eq!(
        lines,
        [
            "PATCH ns/hagroups/g add /metadata/finalizers",
            "EVENT ns/g Warning InvalidManifest: HaGroup ns/g: spec.flow[0].volume.volumeRef: ReplicatedVolume \"data\" is refused (see its status)",
            "EVENT volume ns/data Warning InvalidManifest: ReplicatedVolume ns/data: spec.backing[1].node: \"c\" is not a node of group \"g\" (nodes: {\"a\", \"b\"})",
            "APPLY ns/hagroups/g/status phase=Invalid active=- gen=1 Valid=False,Ready=Unknown lastAction=-",
            "APPLY ns/replicatedvolumes/data/status sync=- Valid=False",
        ]
    );
    assert!(h.core.current_config("a").is_none(), "nothing runs");
}
