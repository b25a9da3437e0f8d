//! Building what one node of a group receives: the spec with every virtual IP made an
//! explicit flow step, the volumes it uses with their stable UUIDs, and the heartbeat key.
//!
//! Pure: the same source and state always build the same [`GroupConfig`], which is what
//! lets revisions move only on real changes.

use std::collections::{BTreeMap, BTreeSet};

use hapair_crds::hagroup::{FlowStep, HaGroupSpec, RestartPolicy, VirtualIpStep, defaults};
use hapair_crds::nodeapi::{GroupConfig, GroupKey, HeartbeatKey, VolumeConfig};
use hapair_crds::validation::is_valid_name;
use rand::RngCore;

use crate::desired::state::GroupSource;

/// Longest step name the API accepts (a DNS label).
const MAX_NAME: usize = 63;

/// The group's config as its nodes receive it, without per-node admin actions.
pub fn group_config(
    key: &GroupKey,
    source: &GroupSource,
    volume_uuids: &mut BTreeMap<GroupKey, String>,
    rng: &mut dyn RngCore,
) -> GroupConfig {
    let mut volumes: Vec<VolumeConfig> = source
        .volumes
        .iter()
        .map(|volume| {
            let name = volume.metadata.name.clone().unwrap_or_default();
            let uuid = volume_uuids
                .entry(GroupKey::new(&key.namespace, &name))
                .or_insert_with(|| {
                    let mut bytes = [0u8; 16];
                    rng.fill_bytes(&mut bytes);
                    uuid::Builder::from_random_bytes(bytes).into_uuid().to_string()
                })
                .clone();
            VolumeConfig { name, uuid, generation: volume.metadata.generation.unwrap_or(0), spec: volume.spec.clone() }
        })
        .collect();
    volumes.sort_by(|a, b| a.name.cmp(&b.name));
    GroupConfig {
        key: key.clone(),
        generation: source.group.metadata.generation.unwrap_or(0),
        spec: with_explicit_vip_steps(&source.group.spec),
        volumes,
        heartbeat_key: HeartbeatKey::Inline(source.heartbeat_key.clone()),
        actions: Vec::new(),
        deleting: false,
    }
}

/// The spec with each virtual IP that no `virtualIP` step names appended as a trailing step,
/// in `virtualIPs` order, so agents never have to know the implicit rule.
///
/// Step names are `vip-<name>`, shortened to a DNS label and suffixed `-2`, `-3`, … when a
/// step of that name already exists.
pub fn with_explicit_vip_steps(spec: &HaGroupSpec) -> HaGroupSpec {
    let referenced: BTreeSet<&str> =
        spec.flow.iter().filter_map(|s| s.virtual_ip.as_ref().map(|v| v.name.as_str())).collect();
    let mut taken: BTreeSet<String> = spec.flow.iter().map(|s| s.name.clone()).collect();
    let mut spec = spec.clone();
    let unreferenced: Vec<String> =
        spec.virtual_ips.iter().filter(|v| !referenced.contains(v.name.as_str())).map(|v| v.name.clone()).collect();
    for vip in unreferenced {
        let name = free_step_name(&format!("vip-{vip}"), &taken);
        taken.insert(name.clone());
        spec.flow.push(vip_step(name, vip));
    }
    spec
}

fn vip_step(name: String, vip: String) -> FlowStep {
    FlowStep {
        name,
        volume: None,
        virtual_ip: Some(VirtualIpStep { name: vip }),
        systemd: None,
        exec: None,
        check: None,
        timeout: defaults::step_timeout(),
        stabilization: hapair_crds::Duration::ZERO,
        restart: RestartPolicy::default(),
    }
}

/// `base`, or `base-N` for the smallest N ≥ 2 not in `taken`, always a valid DNS label.
fn free_step_name(base: &str, taken: &BTreeSet<String>) -> String {
    let fit = |text: &str, room: usize| -> String {
        let cut: String = text.chars().take(room).collect();
        cut.trim_end_matches('-').to_string()
    };
    let first = fit(base, MAX_NAME);
    if !taken.contains(&first) && is_valid_name(&first) {
        return first;
    }
    (2u32..)
        .map(|n| {
            let suffix = format!("-{n}");
            format!("{}{suffix}", fit(base, MAX_NAME - suffix.len()))
        })
        .find(|candidate| !taken.contains(candidate))
        .unwrap_or(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> HaGroupSpec {
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    const BASE: &str = r#"
nodes:
  - {name: a, heartbeatAddresses: [198.18.1.1]}
  - {name: b, heartbeatAddresses: [198.18.1.2]}
virtualIPs:
  - {name: www, address: 198.18.1.80/24, interface: eth0}
  - {name: api, address: 198.18.1.81/24, interface: eth0}
"#;

    #[test]
    fn unreferenced_vips_become_trailing_steps_in_declaration_order() {
        let base = spec(&format!("{BASE}flow:\n  - {{name: web, exec: {{start: s, stop: t}}}}\n"));
        let built = with_explicit_vip_steps(&base);
        let names: Vec<_> = built.flow.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web", "vip-www", "vip-api"]);
        assert_eq!(built.flow[1].virtual_ip, Some(VirtualIpStep { name: "www".into() }));
        hapair_crds::validation::validate_group(&built).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn referenced_vips_are_left_where_the_user_put_them() {
        let base = spec(&format!("{BASE}flow:\n  - {{name: ip, virtualIP: {{name: api}}}}\n"));
        let names: Vec<_> = with_explicit_vip_steps(&base).flow.iter().map(|s| s.name.clone()).collect();
        assert_eq!(names, ["ip", "vip-www"]);
    }

    #[test]
    fn generated_names_avoid_collisions_and_stay_valid_labels() {
        let base = spec(&format!(
            "{BASE}flow:\n  - {{name: vip-www, exec: {{start: s, stop: t}}}}\n  - {{name: vip-www-2, exec: {{start: s, stop: t}}}}\n"
        ));
        let names: Vec<_> = with_explicit_vip_steps(&base).flow.iter().map(|s| s.name.clone()).collect();
        assert_eq!(names, ["vip-www", "vip-www-2", "vip-www-3", "vip-api"]);

        let long = "x".repeat(63);
        let taken: BTreeSet<String> = [format!("vip-{}", "x".repeat(59))].into();
        let first = free_step_name(&format!("vip-{long}"), &BTreeSet::new());
        assert_eq!(first.len(), 63);
        let second = free_step_name(&format!("vip-{long}"), &taken);
        assert!(second.ends_with("-2") && second.len() == 63 && is_valid_name(&second), "{second}");
    }

    #[test]
    fn idempotent_on_its_own_output() {
        let base = spec(BASE);
        let once = with_explicit_vip_steps(&base);
        assert_eq!(with_explicit_vip_steps(&once), once);
    }
}
