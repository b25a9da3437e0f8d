//! What survives a controller restart: the CA (so enrolled nodes keep working), bundle
//! revisions and volume UUIDs, statuses, events, and the last good config of a group whose
//! manifest broke while the controller was down.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use hapair_crds::hagroup::{GroupPhase, NodeRole};
use hapair_crds::nodeapi::{DesiredConfig, paths};

const VOLUME_GROUP: &str = r#"apiVersion: hapair.dev/v1alpha1
kind: ReplicatedVolume
metadata: {name: data}
spec:
  group: g
  size: 1Gi
  backing:
    - {node: a, path: /srv/data.img}
    - {node: b, path: /srv/data.img}
---
apiVersion: hapair.dev/v1alpha1
kind: HaGroup
metadata: {name: g}
spec:
  nodes:
    - {name: a, heartbeatAddresses: [198.18.1.1]}
    - {name: b, heartbeatAddresses: [198.18.1.2]}
  flow:
    - name: data
      volume: {volumeRef: data}
"#;

#[tokio::test]
async fn a_restarted_controller_serves_the_same_bundles_to_the_same_certificates() {
    let mut h = Harness::start(&[("g.yaml", VOLUME_GROUP)]).await;
    let g = key("default", "g");
    let a = h.enroll("a").await;
    let get = |client: &reqwest::Client, base: &str| client.get(format!("{base}{}", paths::config("a"))).send();
    let before: DesiredConfig = get(&a, &h.base).await.unwrap().json().await.unwrap();
    assert_eq!(before.revision, 1);
    let uuid = before.groups[0].volumes[0].uuid.clone();
    let response = a
        .post(h.url(&paths::report("a")))
        .json(&report("a", 1, vec![group_report(&g, NodeRole::Primary, 4)]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let epoch_before = h.overview().await.groups[0].status.epoch;
    assert_eq!(epoch_before, 4);

    // Broken while the controller is down.
    h.write_manifest("g.yaml", &VOLUME_GROUP.replace("size: 1Gi", "size: 1001"));
    h.restart().await;

    // The node's old certificate still works, and it gets exactly the same bundle.
    let after = get(&a, &h.base).await.unwrap();
    assert_eq!(after.status(), 200);
    let after: DesiredConfig = after.json().await.unwrap();
    assert_eq!(after, before);
    assert_eq!(after.groups[0].volumes[0].uuid, uuid);
    let overview = h.overview().await;
    let view = &overview.groups[0];
    assert_eq!(view.status.phase, Some(GroupPhase::Invalid));
    assert_eq!(view.status.epoch, 4, "status continues from before the restart");
    assert!(
        overview.errors.iter().any(|e| e.contains("ReplicatedVolume default/data: spec.size")),
        "{:?}",
        overview.errors
    );
    assert!(view.events.iter().any(|e| e.event.reason == "InvalidManifest"));

    // Repaired: the same content again, so the revision does not move either.
    h.write_manifest("g.yaml", VOLUME_GROUP);
    let repaired = eventually(Duration::from_secs(10), || async {
        let overview = h.overview().await;
        overview.errors.is_empty().then_some(overview)
    })
    .await
    .expect("the repair is picked up");
    assert_ne!(repaired.groups[0].status.phase, Some(GroupPhase::Invalid));
    let again: DesiredConfig = get(&a, &h.base).await.unwrap().json().await.unwrap();
    assert_eq!(again.revision, 1);
    h.shutdown().await;
}
