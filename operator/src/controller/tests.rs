use super::*;
use std::sync::atomic::AtomicUsize;

/// A store in memory that counts snapshots and can be slowed down.
#[derive(Default)]
struct CountingStore {
    snapshots: AtomicUsize,
    saves: AtomicUsize,
    statuses: std::sync::Mutex<Vec<GroupKey>>,
    released: std::sync::Mutex<Vec<GroupKey>>,
    manifests: std::sync::Mutex<Vec<(String, String)>>,
}

impl Store for Arc<CountingStore> {
    async fn snapshot(&self) -> Result<Catalog, StoreError> {
        self.snapshots.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sources = self.manifests.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(Catalog::from_sources(sources.iter().map(|(n, t)| (n.as_str(), t.as_str()))))
    }
    async fn load_state(&self) -> Result<ControllerState, StoreError> {
        Ok(ControllerState::default())
    }
    async fn save_state(&self, _state: &ControllerState) -> Result<(), StoreError> {
        self.saves.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn load_statuses(&self) -> Result<Statuses, StoreError> {
        Ok(Statuses::default())
    }
    async fn write_group_status(&self, key: &GroupKey, _s: Option<&HaGroupStatus>) -> Result<(), StoreError> {
        self.statuses.lock().unwrap_or_else(|p| p.into_inner()).push(key.clone());
        Ok(())
    }
    async fn write_volume_status(&self, _k: &GroupKey, _s: Option<&ReplicatedVolumeStatus>) -> Result<(), StoreError> {
        Ok(())
    }
    async fn record_event(&self, _k: &GroupKey, _e: &GroupEvent) -> Result<(), StoreError> {
        Ok(())
    }
    async fn load_events(&self) -> Result<EventRing, StoreError> {
        Ok(EventRing::default())
    }
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    async fn group_released(&self, key: &GroupKey) -> Result<(), StoreError> {
        self.released.lock().unwrap_or_else(|p| p.into_inner()).push(key.clone());
        Ok(())
    }
}

const GROUP: &str = "apiVersion: hapair.dev/v1alpha1\nkind: HaGroup\nmetadata: {name: g, namespace: ns}\nspec:\n  nodes:\n    - {name: a, heartbeatAddresses: [198.18.1.1]}\n    - {name: b, heartbeatAddresses: [198.18.1.2]}\n";

#[tokio::test]
async fn concurrent_callers_share_full_reconciles() {
    let store = Arc::new(CountingStore::default());
    let controller = Arc::new(
        Controller::start(store.clone(), Settings::default(), Arc::new(Metrics::new()))
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let before = store.snapshots.load(Ordering::SeqCst);
    let callers: Vec<_> = (0..200)
        .map(|_| {
            let c = controller.clone();
            tokio::spawn(async move { c.reconcile_coalesced().await })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    }
    let runs = store.snapshots.load(Ordering::SeqCst) - before;
    // The first caller runs alone; everyone arriving during its run shares the next.
    assert!((1..=3).contains(&runs), "{runs} full reconciles for 200 callers");
    // A caller after those sees its own, fresh run: a change made before it is picked up.
    store.manifests.lock().unwrap_or_else(|p| p.into_inner()).push(("g.yaml".into(), GROUP.into()));
    controller.reconcile_coalesced().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(controller.current_config("a").is_some());
}

#[tokio::test]
async fn a_deleted_group_is_released_once_both_nodes_cleaned_up_and_the_confirmations_are_saved() {
    let store = Arc::new(CountingStore::default());
    store.manifests.lock().unwrap_or_else(|p| p.into_inner()).push(("g.yaml".into(), GROUP.into()));
    let controller = Controller::start(store.clone(), Settings::default(), Arc::new(Metrics::new()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store.manifests.lock().unwrap_or_else(|p| p.into_inner()).clear();
    controller.reconcile().await.unwrap_or_else(|e| panic!("{e}"));
    let key = GroupKey::new("ns", "g");
    assert!(controller.cleanup_pending(&key).await);
    let report = |node: &str| NodeReport {
        node: node.into(),
        applied_revision: 2,
        config_error: None,
        agent_version: "t".into(),
        os: "t".into(),
        uptime_seconds: 1,
        hardware: Default::default(),
        links: vec![],
        wipes: vec![],
        groups: vec![hapair_crds::nodeapi::GroupReport {
            key: key.clone(),
            role: hapair_crds::hagroup::NodeRole::Standby,
            epoch: 0,
            health: hapair_crds::hagroup::NodeHealth::Healthy,
            role_reason: None,
            peer_reachable: true,
            last_peer_heartbeat: None,
            heartbeat_links: vec![],
            steps: vec![],
            monitors: vec![],
            volumes: vec![],
            last_failover: None,
            actions: vec![],
            events: vec![],
            cleaned_up: true,
        }],
    };
    let saves = store.saves.load(Ordering::SeqCst);
    controller
        .accept_report("a", report("a"), hapair_crds::nodeapi::NODE_API_VERSION)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(store.saves.load(Ordering::SeqCst), saves + 1, "a's confirmation is saved");
    assert!(store.released.lock().unwrap_or_else(|p| p.into_inner()).is_empty());
    controller
        .accept_report("b", report("b"), hapair_crds::nodeapi::NODE_API_VERSION)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(*store.released.lock().unwrap_or_else(|p| p.into_inner()), std::slice::from_ref(&key));
    assert!(!controller.cleanup_pending(&key).await);
}
