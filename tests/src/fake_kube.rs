//! An in-process stand-in for the Kubernetes API server, as a tower `Service` a
//! `kube::Client` can be built on. Only the Kubernetes API server may be mocked here (the
//! house rules); this one is for the operator's scale benchmark, where a thousand objects
//! must be listed, watched, patched and counted without a cluster.
//!
//! It keeps objects as JSON by resource, namespace and name, with a global resource
//! version, and serves what the operator uses: list (also as metadata only), watch
//! (streamed, every change after the watch started), get, create, replace (refused with
//! 409 on a stale `resourceVersion`), JSON patch (a `test` for null passes on a missing
//! path, as on the real server), server-side apply of `status` (simplified: the applied
//! status replaces the stored one), and merge patch. Every request is counted by verb.
//! [`FakeApi::forbid`] answers 403 for one resource in one namespace, as missing RBAC does.
//!
//! It is used in process (as the `kube::Client`'s service) or served over plain HTTP from a
//! process of its own ([`FakeApi::serve`]), so that a benchmark can measure the operator's
//! memory without the fake's copy of every object.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Frame;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// A stored object's place: resource (plural), namespace ("" when cluster-scoped), name.
type Place = (String, String, String);

/// One change, as a watch sees it.
#[derive(Clone, Debug)]
struct Change {
    resource: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

/// Requests served, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    pub lists: u64,
    pub watches: u64,
    pub gets: u64,
    pub creates: u64,
    pub replaces: u64,
    pub patches: u64,
    pub status_applies: u64,
}

impl Counts {
    pub fn writes(&self) -> u64 {
        self.creates + self.replaces + self.patches + self.status_applies
    }

    pub fn reads(&self) -> u64 {
        self.lists + self.gets
    }

    /// The counts since `earlier`.
    pub fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            lists: self.lists - earlier.lists,
            watches: self.watches - earlier.watches,
            gets: self.gets - earlier.gets,
            creates: self.creates - earlier.creates,
            replaces: self.replaces - earlier.replaces,
            patches: self.patches - earlier.patches,
            status_applies: self.status_applies - earlier.status_applies,
        }
    }
}

#[derive(Debug, Default)]
struct World {
    objects: BTreeMap<Place, Value>,
    version: u64,
    counts: Counts,
    /// Writes by resource (and subresource), for the benchmark's breakdown.
    writes_by: BTreeMap<String, u64>,
    /// (resource, namespace) pairs answered with 403 Forbidden.
    forbidden: std::collections::BTreeSet<(String, String)>,
    /// Reads (lists, watches, gets) by resource and namespace ("" for all namespaces).
    reads_by: BTreeMap<(String, String), u64>,
}

/// A summary of the objects of one resource ([`FakeApi::tally`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    pub objects: usize,
    pub finalized: usize,
    pub phases: BTreeMap<String, usize>,
}

/// Paths of the fake's own, when served over HTTP: not Kubernetes API paths, not counted.
pub mod control {
    /// [`super::Counts`] as JSON.
    pub const COUNTS: &str = "/fake/counts";
    /// Writes by resource as a JSON object.
    pub const WRITES: &str = "/fake/writes";
    /// `/fake/tally/<resource>?finalizer=<name>`: a [`super::Tally`] as JSON.
    pub const TALLY: &str = "/fake/tally/";
}

/// The fake API server. Cheap to clone; every clone serves the same objects.
#[derive(Clone, Debug)]
pub struct FakeApi {
    world: Arc<Mutex<World>>,
    changes: broadcast::Sender<Change>,
}

impl Default for FakeApi {
    fn default() -> Self {
        FakeApi::new()
    }
}

fn status_body(code: StatusCode, message: &str) -> Value {
    // The API server's machine-readable reasons; clients match on them (kube's `get_opt`
    // looks for NotFound).
    let reason = match code {
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::FORBIDDEN => "Forbidden",
        StatusCode::CONFLICT => "Conflict",
        StatusCode::UNPROCESSABLE_ENTITY => "Invalid",
        StatusCode::BAD_REQUEST => "BadRequest",
        StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowed",
        _ => "Unknown",
    };
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code.as_u16(), "message": message, "reason": reason})
}

fn respond(code: StatusCode, body: &Value) -> Response<BoxBody<Bytes, Infallible>> {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
    let body = http_body_util::Full::new(bytes).boxed();
    let mut response = Response::new(body);
    *response.status_mut() = code;
    response
}

/// `(resource, namespace, name, subresource)` of an API path.
fn route(path: &str) -> Option<(String, String, Option<String>, Option<String>)> {
    let rest = if let Some(rest) = path.strip_prefix("/api/v1/") {
        rest
    } else {
        let rest = path.strip_prefix("/apis/")?;
        // group/version/…
        let mut parts = rest.splitn(3, '/');
        parts.next()?;
        parts.next()?;
        parts.next()?
    };
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let (namespace, rest) = match segments.as_slice() {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (ns.to_string(), rest.to_vec()),
        other => (String::new(), other.to_vec()),
    };
    match rest.as_slice() {
        [resource] => Some((resource.to_string(), namespace, None, None)),
        [resource, name] => Some((resource.to_string(), namespace, Some(name.to_string()), None)),
        [resource, name, sub] => Some((resource.to_string(), namespace, Some(name.to_string()), Some(sub.to_string()))),
        _ => None,
    }
}

fn metadata_only(object: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": object["metadata"].clone()})
}

impl FakeApi {
    pub fn new() -> Self {
        FakeApi { world: Arc::new(Mutex::new(World::default())), changes: broadcast::channel(65_536).0 }
    }

    fn lock(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A `kube::Client` served by this fake.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.clone(), "default")
    }

    /// Stores `object` (its `metadata.namespace`, `metadata.name`) under `resource`, as if
    /// created by someone else.
    pub fn insert(&self, resource: &str, mut object: Value) {
        let mut world = self.lock();
        world.version += 1;
        let version = world.version.to_string();
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or("").to_string();
        let name = object["metadata"]["name"].as_str().unwrap_or("").to_string();
        object["metadata"]["resourceVersion"] = json!(version);
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{resource}-{namespace}-{name}"));
        }
        if object["metadata"]["generation"].is_null() {
            object["metadata"]["generation"] = json!(1);
        }
        world.objects.insert((resource.to_string(), namespace.clone(), name), object.clone());
        let _ = self.changes.send(Change { resource: resource.to_string(), namespace, kind: "ADDED", object });
    }

    /// Answers every request for `resource` in `namespace` with 403 Forbidden (`true`), as
    /// the API server does without RBAC for it, or serves them again (`false`). Watches
    /// already open stay open, as on a real server.
    pub fn forbid(&self, resource: &str, namespace: &str, forbidden: bool) {
        let place = (resource.to_string(), namespace.to_string());
        let mut world = self.lock();
        if forbidden {
            world.forbidden.insert(place);
        } else {
            world.forbidden.remove(&place);
        }
    }

    /// Reads of `resource` so far (lists, watches, gets, also refused ones) by namespace,
    /// "" for requests across all namespaces.
    pub fn reads_of(&self, resource: &str) -> BTreeMap<String, u64> {
        let world = self.lock();
        world.reads_by.iter().filter(|((r, _), _)| r == resource).map(|((_, ns), n)| (ns.clone(), *n)).collect()
    }

    /// Every stored object of `resource`.
    pub fn objects(&self, resource: &str) -> Vec<Value> {
        self.lock().objects.iter().filter(|((r, _, _), _)| r == resource).map(|(_, o)| o.clone()).collect()
    }

    pub fn counts(&self) -> Counts {
        self.lock().counts
    }

    /// How many objects of `resource` there are, how many carry `finalizer`, and how many
    /// are in each `status.phase` (`none` without one), without copying them.
    pub fn tally(&self, resource: &str, finalizer: &str) -> Tally {
        let world = self.lock();
        let mut tally = Tally::default();
        for ((r, _, _), object) in &world.objects {
            if r != resource {
                continue;
            }
            tally.objects += 1;
            if object["metadata"]["finalizers"].as_array().is_some_and(|f| f.iter().any(|f| f == finalizer)) {
                tally.finalized += 1;
            }
            let phase = object["status"]["phase"].as_str().unwrap_or("none").to_string();
            *tally.phases.entry(phase).or_default() += 1;
        }
        tally
    }

    /// Writes so far by resource (`hagroups/status`, `secrets`, `events`, …).
    pub fn writes_by(&self) -> BTreeMap<String, u64> {
        self.lock().writes_by.clone()
    }

    fn store(&self, world: &mut World, place: Place, mut object: Value, kind: &'static str) -> Value {
        world.version += 1;
        object["metadata"]["resourceVersion"] = json!(world.version.to_string());
        world.objects.insert(place.clone(), object.clone());
        let _ = self.changes.send(Change { resource: place.0, namespace: place.1, kind, object: object.clone() });
        object
    }

    fn count_write(world: &mut World, resource: &str, sub: Option<&str>) {
        let key = match sub {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.to_string(),
        };
        *world.writes_by.entry(key).or_default() += 1;
    }

    fn handle(
        &self,
        method: Method,
        path: &str,
        query: &str,
        metadata: bool,
        body: Value,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let Some((resource, namespace, name, sub)) = route(path) else {
            return respond(StatusCode::NOT_FOUND, &status_body(StatusCode::NOT_FOUND, "no such path"));
        };
        let watch = query.split('&').any(|p| p == "watch=true" || p == "watch=1");
        let mut world = self.lock();
        if method == Method::GET {
            *world.reads_by.entry((resource.clone(), namespace.clone())).or_default() += 1;
        }
        if world.forbidden.contains(&(resource.clone(), namespace.clone())) {
            let message = format!("{resource} is forbidden in namespace {namespace:?}");
            return respond(StatusCode::FORBIDDEN, &status_body(StatusCode::FORBIDDEN, &message));
        }
        match (method, name) {
            (Method::GET, None) if watch => {
                world.counts.watches += 1;
                drop(world);
                self.watch(resource, namespace, metadata)
            }
            (Method::GET, None) => {
                world.counts.lists += 1;
                let items: Vec<Value> = world
                    .objects
                    .iter()
                    .filter(|((r, ns, _), _)| *r == resource && (namespace.is_empty() || *ns == namespace))
                    .map(|(_, o)| if metadata { metadata_only(o) } else { o.clone() })
                    .collect();
                let list = json!({
                    "apiVersion": if metadata { "meta.k8s.io/v1" } else { "v1" },
                    "kind": if metadata { "PartialObjectMetadataList" } else { "List" },
                    "metadata": {"resourceVersion": world.version.to_string()},
                    "items": items,
                });
                respond(StatusCode::OK, &list)
            }
            (Method::GET, Some(name)) => {
                world.counts.gets += 1;
                match world.objects.get(&(resource, namespace, name)) {
                    Some(object) => respond(StatusCode::OK, object),
                    None => respond(StatusCode::NOT_FOUND, &status_body(StatusCode::NOT_FOUND, "not found")),
                }
            }
            (Method::POST, None) => {
                world.counts.creates += 1;
                FakeApi::count_write(&mut world, &resource, None);
                let name = body["metadata"]["name"].as_str().unwrap_or("").to_string();
                let resource_name = resource.clone();
                let place = (resource, namespace.clone(), name);
                if world.objects.contains_key(&place) {
                    return respond(StatusCode::CONFLICT, &status_body(StatusCode::CONFLICT, "already exists"));
                }
                let mut object = body;
                object["metadata"]["namespace"] = json!(namespace);
                object["metadata"]["uid"] = json!(format!("uid-{}", world.version + 1));
                if resource_name == "events" {
                    // Counted, answered, not kept: nothing reads them back here, and thousands
                    // of kept Events would be counted as the operator's memory.
                    world.version += 1;
                    object["metadata"]["resourceVersion"] = json!(world.version.to_string());
                    return respond(StatusCode::CREATED, &object);
                }
                let stored = self.store(&mut world, place, object, "ADDED");
                respond(StatusCode::CREATED, &stored)
            }
            (Method::PUT, Some(name)) => {
                world.counts.replaces += 1;
                FakeApi::count_write(&mut world, &resource, None);
                let place = (resource, namespace, name);
                let Some(current) = world.objects.get(&place) else {
                    return respond(StatusCode::NOT_FOUND, &status_body(StatusCode::NOT_FOUND, "not found"));
                };
                if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                    return respond(
                        StatusCode::CONFLICT,
                        &status_body(StatusCode::CONFLICT, "the object has been modified"),
                    );
                }
                let stored = self.store(&mut world, place, body, "MODIFIED");
                respond(StatusCode::OK, &stored)
            }
            (Method::PATCH, Some(name)) => {
                if sub.as_deref() == Some("status") {
                    world.counts.status_applies += 1;
                } else {
                    world.counts.patches += 1;
                }
                FakeApi::count_write(&mut world, &resource, sub.as_deref());
                let place = (resource, namespace, name);
                let Some(mut object) = world.objects.get(&place).cloned() else {
                    return respond(StatusCode::NOT_FOUND, &status_body(StatusCode::NOT_FOUND, "not found"));
                };
                if sub.as_deref() == Some("status") {
                    object["status"] = body["status"].clone();
                } else if let Value::Array(operations) = &body {
                    let kept: Vec<Value> = operations
                        .iter()
                        .filter(|op| {
                            let missing = op["path"].as_str().is_some_and(|p| object.pointer(p).is_none());
                            !(op["op"] == json!("test") && op["value"].is_null() && missing)
                        })
                        .cloned()
                        .collect();
                    let patch: json_patch::Patch = match serde_json::from_value(Value::Array(kept)) {
                        Ok(patch) => patch,
                        Err(e) => {
                            return respond(
                                StatusCode::BAD_REQUEST,
                                &status_body(StatusCode::BAD_REQUEST, &e.to_string()),
                            );
                        }
                    };
                    if let Err(e) = json_patch::patch(&mut object, &patch) {
                        return respond(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            &status_body(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()),
                        );
                    }
                } else {
                    json_patch::merge(&mut object, &body);
                }
                let stored = self.store(&mut world, place, object, "MODIFIED");
                respond(StatusCode::OK, &stored)
            }
            (method, _) => respond(
                StatusCode::METHOD_NOT_ALLOWED,
                &status_body(StatusCode::METHOD_NOT_ALLOWED, &format!("{method} is not served here")),
            ),
        }
    }

    /// A watch: every later change of `resource` (in `namespace`, when given), one JSON
    /// line each, until the client goes away.
    fn watch(&self, resource: String, namespace: String, metadata: bool) -> Response<BoxBody<Bytes, Infallible>> {
        let receiver = self.changes.subscribe();
        let stream = futures::stream::unfold(receiver, move |mut receiver| {
            let (resource, namespace) = (resource.clone(), namespace.clone());
            async move {
                loop {
                    match receiver.recv().await {
                        Ok(change)
                            if change.resource == resource
                                && (namespace.is_empty() || change.namespace == namespace) =>
                        {
                            let object = if metadata { metadata_only(&change.object) } else { change.object };
                            let mut line =
                                serde_json::to_vec(&json!({"type": change.kind, "object": object})).unwrap_or_default();
                            line.push(b'\n');
                            return Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), receiver));
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        let body = http_body_util::StreamBody::new(stream).boxed();
        Response::new(body)
    }
}

impl FakeApi {
    /// Serves the fake over plain HTTP/1.1 on `listener` until the returned future is
    /// dropped: the Kubernetes paths as in process, plus the [`control`] paths.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        loop {
            let (stream, _) = listener.accept().await?;
            let api = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let api = api.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        if let Some(answer) = api.control(parts.uri.path(), parts.uri.query().unwrap_or("")) {
                            return Ok::<_, Infallible>(respond(StatusCode::OK, &answer));
                        }
                        let request = Request::from_parts(parts, Body::from(bytes.to_vec()));
                        let mut service = api;
                        tower::Service::call(&mut service, request).await
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                    tracing::debug!(error = %e, "fake API connection ended");
                }
            });
        }
    }

    fn control(&self, path: &str, query: &str) -> Option<Value> {
        if path == control::COUNTS {
            return serde_json::to_value(self.counts()).ok();
        }
        if path == control::WRITES {
            return serde_json::to_value(self.writes_by()).ok();
        }
        let resource = path.strip_prefix(control::TALLY)?;
        let finalizer = query.split('&').find_map(|p| p.strip_prefix("finalizer=")).unwrap_or("");
        serde_json::to_value(self.tally(resource, finalizer)).ok()
    }
}

impl tower::Service<Request<Body>> for FakeApi {
    type Response = Response<BoxBody<Bytes, Infallible>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let api = self.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let body: Value =
                if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
            let metadata = parts
                .headers
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("as=PartialObjectMetadata"));
            tracing::debug!(method = %parts.method, path = parts.uri.path(), query = parts.uri.query().unwrap_or(""), metadata, "fake API request");
            let response = api.handle(parts.method, parts.uri.path(), parts.uri.query().unwrap_or(""), metadata, body);
            tracing::debug!(status = %response.status(), "fake API answer");
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_namespaced_cluster_wide_and_subresource_paths() {
        assert_eq!(route("/api/v1/secrets"), Some(("secrets".into(), String::new(), None, None)));
        assert_eq!(
            route("/apis/hapair.dev/v1alpha1/namespaces/ns/hagroups/g/status"),
            Some(("hagroups".into(), "ns".into(), Some("g".into()), Some("status".into())))
        );
        assert_eq!(
            route("/apis/coordination.k8s.io/v1/namespaces/op/leases/l"),
            Some(("leases".into(), "op".into(), Some("l".into()), None))
        );
        assert_eq!(route("/healthz"), None);
    }

    #[tokio::test]
    async fn replace_is_compare_and_swap() {
        use k8s_openapi::api::core::v1::Secret;
        let api = FakeApi::new();
        let secrets: kube::Api<Secret> = kube::Api::namespaced(api.client(), "op");
        let mut secret = Secret::default();
        secret.metadata.name = Some("s".into());
        let created = secrets.create(&Default::default(), &secret).await.unwrap_or_else(|e| panic!("{e}"));
        let replaced = secrets.replace("s", &Default::default(), &created).await.unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(replaced.metadata.resource_version, created.metadata.resource_version);
        let stale = secrets.replace("s", &Default::default(), &created).await;
        assert!(matches!(stale, Err(kube::Error::Api(s)) if s.code == 409));
        assert_eq!(api.counts().writes(), 3);
    }

    #[tokio::test]
    async fn served_over_http_it_answers_kube_clients_and_its_own_control_paths() {
        use k8s_openapi::api::core::v1::Secret;
        let api = FakeApi::new();
        api.insert(
            "hagroups",
            json!({"metadata": {"name": "g", "namespace": "ns", "finalizers": ["f"]}, "status": {"phase": "Healthy"}}),
        );
        api.insert("hagroups", json!({"metadata": {"name": "h", "namespace": "ns"}}));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let base = format!("http://{}", listener.local_addr().unwrap_or_else(|e| panic!("{e}")));
        let server = tokio::spawn(api.clone().serve(listener));
        let config = kube::Config::new(base.parse().unwrap_or_else(|e| panic!("{e}")));
        let client = kube::Client::try_from(config).unwrap_or_else(|e| panic!("{e}"));
        let secrets: kube::Api<Secret> = kube::Api::namespaced(client, "op");
        let mut secret = Secret::default();
        secret.metadata.name = Some("s".into());
        secrets.create(&Default::default(), &secret).await.unwrap_or_else(|e| panic!("{e}"));
        let listed = secrets.list(&Default::default()).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(listed.items.len(), 1);
        let get = |path: String| async move {
            let response = reqwest::get(path).await.unwrap_or_else(|e| panic!("{e}"));
            response.json::<Value>().await.unwrap_or_else(|e| panic!("{e}"))
        };
        let counts: Counts =
            serde_json::from_value(get(format!("{base}{}", control::COUNTS)).await).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((counts.creates, counts.lists), (1, 1), "control requests are not counted");
        assert_eq!(get(format!("{base}{}", control::WRITES)).await, json!({"secrets": 1}));
        let tally: Tally = serde_json::from_value(get(format!("{base}{}hagroups?finalizer=f", control::TALLY)).await)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            tally,
            Tally { objects: 2, finalized: 1, phases: [("Healthy".into(), 1), ("none".into(), 1)].into() }
        );
        server.abort();
    }
}
