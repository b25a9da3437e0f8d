//! The Kubernetes operator against a real cluster (kind, k3d or any other), when
//! `HAPAIR_E2E_KUBECONFIG` names a kubeconfig with cluster-admin rights. See
//! `docs/k8s-e2e.md`.
//!
//! It applies the CRDs (server-side, field manager `hapair-e2e`) and the examples (into
//! namespaces of their own, so nothing of the cluster's is touched), runs an operator
//! replica in this process (leader election, term, controllers, Kubernetes store), and
//! waits until every example HaGroup carries the finalizer and a status for its current
//! generation, with `Valid=True`; then it checks the operator's own Secrets and Lease and
//! removes what it created (the CRDs stay: the cluster may hold other hapair objects).
//!
//! These build machines have no cluster: without the variable the test is reported as
//! `ignored` by the test runner (its own harness, libtest-mimic, decides that at run time),
//! never as passed. `--ignored` or `--include-ignored` without the variable fails, naming it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::FutureExt;
use hapair_crds::manifest::{Object, parse_documents};
use hapair_crds::{HaGroup, ReplicatedVolume};
use hapair_operator::k8s::election::ElectionTiming;
use hapair_operator::k8s::run::{RunConfig, run};
use hapair_operator::k8s::term::TermConfig;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};

const MANAGER: &str = "hapair-e2e";
const LIMIT: Duration = Duration::from_secs(180);

fn say(text: &str) {
    // Straight to stderr: the test harness captures print! and eprint!, not this.
    let _ = writeln!(std::io::stderr(), "k8s_e2e: {text}");
}

async fn client(path: &Path) -> Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Client::try_from(config).unwrap()
}

async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {LIMIT:?} waiting for {what}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The examples, each object moved into `<its namespace>-<suffix>`.
fn examples(suffix: &str) -> Vec<Object> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut objects = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let (docs, errors) = parse_documents(&path.display().to_string(), &std::fs::read_to_string(&path).unwrap());
        assert!(errors.is_empty(), "{errors:?}");
        for doc in docs {
            let namespace = format!("{}-{suffix}", doc.object.namespace());
            let mut object = doc.object;
            match &mut object {
                Object::Group(g) => g.metadata.namespace = Some(namespace),
                Object::Volume(v) => v.metadata.namespace = Some(namespace),
                Object::Secret(s) => s.metadata.namespace = Some(namespace),
            }
            objects.push(object);
        }
    }
    objects
}

async fn apply<K>(client: &Client, namespace: &str, object: &K)
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch(&object.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(object))
        .await
        .unwrap_or_else(|e| panic!("applying {} {namespace}/{}: {e}", K::kind(&()), object.name_any()));
}

const NO_CLUSTER: &str = "needs a Kubernetes cluster: set HAPAIR_E2E_KUBECONFIG (see docs/k8s-e2e.md)";

fn main() -> std::process::ExitCode {
    let args = libtest_mimic::Arguments::from_args();
    let kubeconfig = std::env::var_os("HAPAIR_E2E_KUBECONFIG");
    if kubeconfig.is_none() && !args.list {
        say(&format!("ignored: {NO_CLUSTER}"));
    }
    let trial = libtest_mimic::Trial::test("the_operator_reconciles_the_examples_on_a_real_cluster", {
        let kubeconfig = kubeconfig.clone();
        move || {
            let Some(kubeconfig) = kubeconfig else {
                return Err(NO_CLUSTER.into());
            };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(the_operator_reconciles_the_examples_on_a_real_cluster(Path::new(&kubeconfig)));
            Ok(())
        }
    })
    .with_ignored_flag(kubeconfig.is_none());
    libtest_mimic::run(&args, vec![trial]).exit_code()
}

async fn the_operator_reconciles_the_examples_on_a_real_cluster(kubeconfig: &Path) {
    let client = client(kubeconfig).await;
    let suffix = format!("e2e{}", std::process::id());
    let operator_ns = format!("hapair-{suffix}");
    let objects = examples(&suffix);
    let mut namespaces: Vec<String> = objects.iter().map(|o| o.namespace().to_string()).collect();
    namespaces.push(operator_ns.clone());
    namespaces.sort();
    namespaces.dedup();

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let body = {
        let client = client.clone();
        let (objects, namespaces, operator_ns) = (objects.clone(), namespaces.clone(), operator_ns.clone());
        async move {
            let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
            for crd in hapair_crds::crd::all() {
                crds.patch(&crd.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&crd)).await.unwrap();
                let name = crd.name_any();
                eventually(&format!("CRD {name} established"), || async {
                    let current = crds.get(&name).await.ok()?;
                    let conditions = current.status?.conditions?;
                    conditions.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
                })
                .await;
            }
            say("CRDs applied and established");
            let api: Api<Namespace> = Api::all(client.clone());
            for ns in &namespaces {
                let namespace = Namespace {
                    metadata: kube::api::ObjectMeta { name: Some(ns.clone()), ..Default::default() },
                    ..Default::default()
                };
                api.create(&PostParams::default(), &namespace).await.unwrap_or_else(|e| panic!("namespace {ns}: {e}"));
            }
            for object in &objects {
                match object {
                    Object::Secret(s) => apply(&client, object.namespace(), s.as_ref()).await,
                    Object::Volume(v) => apply(&client, object.namespace(), v.as_ref()).await,
                    Object::Group(g) => apply(&client, object.namespace(), g.as_ref()).await,
                }
            }
            say(&format!("{} example objects applied into namespaces {}", objects.len(), namespaces.join(", ")));

            let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
            let config = RunConfig {
                node_api_listen: any,
                metrics_listen: any,
                server_names: vec!["localhost".into()],
                lease_name: "hapair-e2e-leader".into(),
                pki_secret: "hapair-e2e-pki".into(),
                election: ElectionTiming {
                    lease_duration: Duration::from_secs(6),
                    renew_deadline: Duration::from_secs(4),
                    retry_period: Duration::from_secs(1),
                },
                term: TermConfig {
                    // The examples' heartbeat-key Secrets: Secrets are read only where told.
                    secret_namespaces: namespaces.clone(),
                    ..TermConfig::new(&operator_ns, "e2e-replica-0", "hapair-e2e-state", "hapair-e2e-tokens")
                },
                runtime_file: None,
            };
            let operator = tokio::spawn(run(client.clone(), config, None, async move {
                let _ = stopped.await;
            }));

            for object in &objects {
                let Object::Group(group) = object else { continue };
                let key = format!("{}/{}", object.namespace(), group.name_any());
                let groups: Api<HaGroup> = Api::namespaced(client.clone(), object.namespace());
                let status = eventually(&format!("status of HaGroup {key}"), || async {
                    let current = groups.get(&group.name_any()).await.ok()?;
                    let finalized = current.finalizers().iter().any(|f| f == "hapair.dev/cleanup");
                    let status = current.status.clone()?;
                    (finalized && status.observed_generation == current.metadata.generation).then_some(status)
                })
                .await;
                let valid = hapair_crds::condition::find(&status.conditions, "Valid").map(|c| c.status);
                assert_eq!(valid, Some(hapair_crds::condition::ConditionStatus::True), "{key}: {status:?}");
                say(&format!("HaGroup {key}: phase {:?}, Valid=True, finalizer present", status.phase));
            }
            for object in &objects {
                let Object::Volume(volume) = object else { continue };
                let volumes: Api<ReplicatedVolume> = Api::namespaced(client.clone(), object.namespace());
                eventually(&format!("finalizer on ReplicatedVolume {}", volume.name_any()), || async {
                    let current = volumes.get(&volume.name_any()).await.ok()?;
                    current.finalizers().iter().any(|f| f == "hapair.dev/cleanup").then_some(())
                })
                .await;
            }
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &operator_ns);
            assert!(secrets.get_opt("hapair-e2e-pki").await.unwrap().is_some(), "the CA Secret");
            let state = secrets.list(&Default::default()).await.unwrap();
            assert!(state.items.iter().any(|s| s.name_any().starts_with("hapair-e2e-state-")), "state Secrets");
            let leases: Api<Lease> = Api::namespaced(client.clone(), &operator_ns);
            let lease = leases.get("hapair-e2e-leader").await.unwrap();
            assert_eq!(lease.spec.and_then(|s| s.holder_identity).as_deref(), Some("e2e-replica-0"));
            say("operator Secrets and leader Lease present");
            let _ = stop.send(());
            operator.await.unwrap().unwrap();
        }
    };
    let outcome = std::panic::AssertUnwindSafe(body).catch_unwind().await;
    if outcome.is_err() {
        // The stop sender went with the failed body; give the operator a moment to end its
        // term so it does not put back the finalizers removed below.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }

    // Clean up whatever happened: let the objects go, then the namespaces.
    for object in &objects {
        let release = serde_json::json!({"metadata": {"finalizers": null}});
        let params = PatchParams::default();
        let name = object.name().to_string();
        let _ = match object {
            Object::Group(_) => Api::<HaGroup>::namespaced(client.clone(), object.namespace())
                .patch(&name, &params, &Patch::Merge(&release))
                .await
                .map(|_| ()),
            Object::Volume(_) => Api::<ReplicatedVolume>::namespaced(client.clone(), object.namespace())
                .patch(&name, &params, &Patch::Merge(&release))
                .await
                .map(|_| ()),
            Object::Secret(_) => Ok(()),
        };
    }
    let api: Api<Namespace> = Api::all(client.clone());
    for ns in &namespaces {
        let _ = api.delete(ns, &DeleteParams::default()).await;
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    say("passed; test namespaces deleted");
}
