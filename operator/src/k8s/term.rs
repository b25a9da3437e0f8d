//! A term: everything an operator replica runs while it is the elected leader.
//!
//! Starting a term builds everything afresh: the caches (kube-runtime reflectors for
//! HaGroups, ReplicatedVolumes and, in each namespace the operator reads Secrets in, Secret
//! metadata), the two kube-runtime `Controller`s, the store, the reconcile core (loaded from
//! the state Secrets) and the node API with a new witness authority. Nothing of a previous term is reused, so a replica that leads again
//! after losing the lead starts from what the API server says, and the new witness waits
//! out its restart period before granting anything.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use futures::StreamExt;
use hapair_crds::nodeapi::GroupKey;
use hapair_crds::{HaGroup, ReplicatedVolume};
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::controller::metrics::Metrics;
use crate::controller::{Controller, Settings};
use crate::k8s::K8sError;
use crate::k8s::reconciler::{Context, error_policy, reconcile_group, reconcile_volume};
use crate::k8s::state_secrets::StateSecrets;
use crate::k8s::store::{Caches, KubeStore, NamespaceSecrets, SecretCaches};
use crate::k8s::token_secret::TokenSecret;
use crate::k8s::writer::Writer;
use crate::pki::Ca;
use crate::server::{ApiSettings, NodeApi, router};
use crate::witness::lease::LeaseAuthority;

/// How a term runs.
#[derive(Clone, Debug)]
pub struct TermConfig {
    /// The operator's namespace: state and token Secrets live here.
    pub namespace: String,
    /// Namespaces besides `namespace` whose Secrets groups may name as heartbeat keys. Only
    /// these are watched (and the chart's Roles grant only these), never the whole cluster.
    pub secret_namespaces: Vec<String>,
    /// This replica's name (the pod's), in Events.
    pub identity: String,
    /// State Secrets are `<prefix>-0` … `<prefix>-15`.
    pub state_prefix: String,
    pub tokens_secret: String,
    pub controller: Settings,
    pub api: ApiSettings,
    /// How often time-dependent state (stale reports, action timeouts) is re-evaluated.
    pub tick: Duration,
    /// Parallel writers of statuses and Events.
    pub writers: usize,
}

impl TermConfig {
    pub fn new(namespace: &str, identity: &str, state_prefix: &str, tokens_secret: &str) -> Self {
        TermConfig {
            namespace: namespace.to_string(),
            secret_namespaces: Vec::new(),
            identity: identity.to_string(),
            state_prefix: state_prefix.to_string(),
            tokens_secret: tokens_secret.to_string(),
            controller: Settings::default(),
            api: ApiSettings::default(),
            tick: Duration::from_secs(2),
            writers: 4,
        }
    }
}

/// Background tasks that end with their owner: a term that fails to start, or ends, must
/// leave no controller running.
#[derive(Debug, Default)]
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// A running term.
#[derive(Debug)]
pub struct Term {
    core: Arc<Controller<KubeStore>>,
    router: Router,
    _tasks: Tasks,
}

impl Term {
    /// Starts a term and returns once the caches are filled, the core has run its first
    /// reconcile and the node API router is ready to be served. `authority` is the term's
    /// witness (already fenced by the caller).
    pub async fn start(
        client: Client,
        ca: Arc<Ca>,
        config: &TermConfig,
        authority: Option<Box<dyn LeaseAuthority>>,
        metrics: Arc<Metrics>,
    ) -> Result<Term, K8sError> {
        let mut tasks = Tasks::default();
        let (core_tx, core_rx) = watch::channel(None);
        let ctx = Arc::new(Context::new(client.clone(), core_rx.clone(), metrics.clone()));

        // One watch per resource, shared by the controller (its triggers) and the store (the
        // snapshot), each announcing its first complete listing on its own channel.
        let (groups, groups_writer) = reflector::store_shared::<HaGroup>(SHARED_BUFFER);
        let (volumes, volumes_writer) = reflector::store_shared::<ReplicatedVolume>(SHARED_BUFFER);
        let mut secrets = SecretCaches::default();
        let mut secret_watches = Vec::new();
        let mut secret_namespaces: Vec<&str> = config.secret_namespaces.iter().map(String::as_str).collect();
        secret_namespaces.push(&config.namespace);
        secret_namespaces.sort_unstable();
        secret_namespaces.dedup();
        for namespace in secret_namespaces {
            let (cache, writer) = reflector::store::<PartialObjectMeta<Secret>>();
            let denied = Arc::new(std::sync::Mutex::new(None));
            secrets.insert(namespace, NamespaceSecrets { cache, denied: denied.clone() });
            secret_watches.push((namespace.to_string(), writer, denied));
        }
        let caches = Caches {
            groups: groups.clone(),
            volumes: volumes.clone(),
            secrets,
            synced: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let group_events =
            groups_writer.subscribe().ok_or_else(|| K8sError::Invalid("the HaGroup store cannot be shared".into()))?;
        let volume_events = volumes_writer
            .subscribe()
            .ok_or_else(|| K8sError::Invalid("the ReplicatedVolume store cannot be shared".into()))?;
        let (groups_synced, groups_ready) = watch::channel(false);
        let (volumes_synced, volumes_ready) = watch::channel(false);
        let groups_api: Api<HaGroup> = Api::all(client.clone());
        let volumes_api: Api<ReplicatedVolume> = Api::all(client.clone());
        tasks.0.push(tokio::spawn(reflect("HaGroups", groups_api, groups_writer, groups_synced)));
        tasks.0.push(tokio::spawn(reflect("ReplicatedVolumes", volumes_api, volumes_writer, volumes_synced)));
        let group_controller = kube::runtime::Controller::for_shared_stream(group_events, groups);
        let volume_controller = kube::runtime::Controller::for_shared_stream(volume_events, volumes);

        tasks.0.push(tokio::spawn(group_controller.run(reconcile_group, error_policy, ctx.clone()).for_each(
            |result| async move {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HaGroup controller");
                }
            },
        )));
        tasks.0.push(tokio::spawn(volume_controller.run(reconcile_volume, error_policy, ctx.clone()).for_each(
            |result| async move {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "ReplicatedVolume controller");
                }
            },
        )));
        let mut secrets_ready = Vec::new();
        for (namespace, writer, denied) in secret_watches {
            let (synced, ready) = watch::channel(false);
            secrets_ready.push((format!("Secrets in namespace {namespace}"), ready));
            let watch =
                SecretWatch { namespace, writer, denied, caches: caches.clone(), core: core_rx.clone(), synced };
            tasks.0.push(tokio::spawn(watch_secrets(client.clone(), watch)));
        }

        let mut ready: Vec<(String, watch::Receiver<bool>)> =
            vec![("HaGroups".into(), groups_ready), ("ReplicatedVolumes".into(), volumes_ready)];
        ready.extend(secrets_ready);
        for (what, mut ready) in ready {
            ready
                .wait_for(|synced| *synced)
                .await
                .map_err(|_| K8sError::Invalid(format!("the watch of {what} stopped before it listed them")))?;
        }
        caches.synced.store(true, std::sync::atomic::Ordering::SeqCst);
        info!(
            groups = caches.groups.state().len(),
            volumes = caches.volumes.state().len(),
            "caches filled; starting the reconcile core"
        );
        let secrets_api: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
        let state = StateSecrets::new(secrets_api.clone(), &config.state_prefix, metrics.clone());
        let writer = Writer::start(
            client.clone(),
            caches.groups.clone(),
            caches.volumes.clone(),
            &config.identity,
            config.writers,
            metrics.clone(),
        );
        let store = KubeStore::new(client.clone(), caches, state, writer, metrics.clone());
        let core = Arc::new(Controller::start(store, config.controller.clone(), metrics.clone()).await?);
        let authority = match authority {
            Some(mut authority) => {
                // The term's witness is new and knows no epochs: the ones the groups'
                // statuses record keep its grants above every epoch that already served.
                for group in core.overview().await.groups {
                    authority.restore_epoch(&group.key, group.status.epoch);
                }
                Some(authority)
            }
            None => None,
        };
        let tokens = TokenSecret::new(secrets_api, &config.tokens_secret, Some(metrics.clone()));
        let api = Arc::new(NodeApi::new(core.clone(), ca, tokens, authority, config.api.clone()));
        let router = router(api);
        let _ = core_tx.send_replace(Some(core.clone()));
        // The reconciles hold receivers; the sender must live as long as the term.
        let keep = core_tx;
        let ticking = core.clone();
        let every = config.tick;
        tasks.0.push(tokio::spawn(async move {
            let _sender = keep;
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                if let Err(e) = ticking.tick().await {
                    warn!(error = %e, "periodic reconcile failed");
                }
            }
        }));
        Ok(Term { core, router, _tasks: tasks })
    }

    pub fn core(&self) -> &Arc<Controller<KubeStore>> {
        &self.core
    }

    /// The node API of this term, to be served while it lasts.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// Ends the term: every task stops; nothing more is written.
    pub fn stop(self) {
        drop(self);
    }
}

/// Room for object changes between the shared reflector and the controller reading them.
const SHARED_BUFFER: usize = 1024;

/// Drives the watch of one resource into its shared store, and says when it first listed
/// everything.
async fn reflect<K>(what: &'static str, api: Api<K>, writer: reflector::store::Writer<K>, synced: watch::Sender<bool>)
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let stream = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(|object| object.meta_mut().managed_fields = None);
    // `reflector`, not `reflect`: only it hands the changes on to the controller.
    let mut events = std::pin::pin!(reflector::reflector(writer, stream));
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::InitDone) => {
                synced.send_replace(true);
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "watching {what}"),
        }
    }
}

/// The watch of the Secrets of one namespace.
struct SecretWatch {
    namespace: String,
    writer: reflector::store::Writer<PartialObjectMeta<Secret>>,
    /// Set while the API server refuses to list them; cleared once it lists them.
    denied: Arc<std::sync::Mutex<Option<String>>>,
    caches: Caches,
    core: watch::Receiver<Option<Arc<Controller<KubeStore>>>>,
    synced: watch::Sender<bool>,
}

/// The API server's refusal, when a watch error is one: missing RBAC, not a passing fault.
fn forbidden(error: &watcher::Error) -> Option<String> {
    let status = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status))
        | watcher::Error::WatchError(status) => status,
        _ => return None,
    };
    status.is_forbidden().then(|| status.to_string())
}

/// Keeps the cache of one namespace's Secret metadata, and reruns the core when a Secret
/// some group references (its heartbeat key) is created, changed or deleted, or when the
/// operator loses or gains the right to list them.
async fn watch_secrets(client: Client, watch: SecretWatch) {
    let SecretWatch { namespace, writer, denied, caches, core, synced } = watch;
    // Metadata only: the data of the few Secrets groups reference is read on demand.
    let secrets: Api<PartialObjectMeta<Secret>> = Api::namespaced(client, &namespace);
    let stream = watcher(secrets, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(|meta| meta.metadata.managed_fields = None);
    let mut changes = std::pin::pin!(reflector::reflector(writer, stream));
    let set_denied = |why: Option<String>| {
        let mut denied = denied.lock().unwrap_or_else(|p| p.into_inner());
        let changed = *denied != why;
        *denied = why;
        changed
    };
    while let Some(change) = changes.next().await {
        let rerun = match change {
            Ok(watcher::Event::InitDone) => {
                synced.send_replace(true);
                // Listed at last after a refusal: the groups refused for it may now resolve.
                set_denied(None)
            }
            Ok(watcher::Event::Apply(meta) | watcher::Event::Delete(meta)) => {
                let key = GroupKey::new(meta.namespace().unwrap_or_default(), meta.name_any());
                let referenced = referenced(&caches, &key);
                if referenced {
                    info!(secret = %key, "a referenced Secret changed; reconciling");
                }
                referenced
            }
            Ok(_) => false,
            Err(e) => match forbidden(&e) {
                Some(why) => {
                    // Not a reason to hold the term back: the groups that need these
                    // Secrets are refused naming them; the watch keeps retrying.
                    synced.send_replace(true);
                    let changed = set_denied(Some(why.clone()));
                    if changed {
                        warn!(namespace = %namespace, error = %why, "may not list Secrets in this namespace");
                    }
                    changed
                }
                None => {
                    warn!(namespace = %namespace, error = %e, "watching Secrets");
                    false
                }
            },
        };
        if !rerun {
            continue;
        }
        let Some(core) = core.borrow().clone() else { continue };
        if let Err(e) = core.reconcile_coalesced().await {
            warn!(namespace = %namespace, error = %e, "reconcile after a Secret change failed");
        }
    }
}

/// Whether some group names the Secret `key` as its heartbeat key (also when the Secret was
/// just deleted: the group is then refused, and keeps its last good config).
fn referenced(caches: &Caches, key: &GroupKey) -> bool {
    caches.groups.state().iter().any(|g| {
        g.namespace().as_deref() == Some(key.namespace.as_str())
            && g.spec.heartbeat.key_secret_ref.as_ref().is_some_and(|r| r.name == key.name)
    })
}
